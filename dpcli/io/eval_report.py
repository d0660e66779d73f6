"""The files of a ``dp eval`` report folder: report.json, grid.png and samples.safetensors; the samples
written and a report read back (``dp compare --report``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from dpcli.errors import BadInput, BadSetting
from dpcli.io.files import read_json

if TYPE_CHECKING:
    import torch

    from dpcli.sampling import Samples

REPORT_FILE = "report.json"
GRID_FILE = "grid.png"
SAMPLES_FILE = "samples.safetensors"
REPORT_FORMAT = "dpcli-eval"


def write_samples(samples: Samples, path: Path, model: str) -> None:
    import torch
    from safetensors.torch import save_file

    metadata = {"format": "dpcli-samples", "model": model, "sampling": json.dumps(samples.describe())}
    tensors = {
        "images": samples.images.contiguous(),
        "indices": torch.tensor(samples.indices, dtype=torch.long),
    }
    save_file(tensors, str(path), metadata=metadata)


def read_eval_report(path: Path) -> tuple[dict, torch.Tensor | None, Path]:
    """A dp eval report (report.json, or the folder holding it) and its samples when present."""
    path = Path(path).expanduser()
    file = path / REPORT_FILE if path.is_dir() else path
    if not file.is_file():
        raise BadSetting(
            "reports",
            "{reports} {path}: no dp eval report there (expected {file})",
            path=path,
            file=REPORT_FILE,
        )
    report = read_json(file)
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise BadInput(f"{file} is not a dp eval report")
    images = None
    samples_file = file.parent / ((report.get("files") or {}).get("samples") or SAMPLES_FILE)
    if samples_file.is_file():
        from dpcli.io.weights import load_tensor_file

        images = load_tensor_file(samples_file).get("images")
    return report, images, file
