"""The scores file ``dp score`` writes and ``dp prune --scores`` reads: safetensors, one tensor per group
key, with the scoring settings, the model's signature and the timestep scan (cutoff, losses) in the
metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dpcli import __version__
from dpcli.errors import BadInput
from dpcli.io.files import atomic_write

if TYPE_CHECKING:
    import torch

SCORES_FORMAT = "dpcli-scores"


@dataclass
class ScoresFile:
    """What a scores file holds: ``cutoff`` is None when the criterion ran no timestep scan."""

    tensors: dict[str, torch.Tensor]
    settings: dict
    model: str
    model_signature: str
    cutoff: int | None = None
    losses: list[float] = field(default_factory=list)


def write_scores_file(path: Path, scores: ScoresFile) -> None:
    """Write ``scores`` to ``path`` atomically (a reader never sees half a file)."""
    from safetensors.torch import save_file

    metadata = {
        "format": SCORES_FORMAT,
        "dpcli_version": __version__,
        "model": scores.model,
        "model_signature": scores.model_signature,
        "settings": json.dumps(scores.settings),
        "cutoff": json.dumps(scores.cutoff),
        "losses": json.dumps(scores.losses),
    }
    tensors = {key: tensor.contiguous() for key, tensor in scores.tensors.items()}
    with atomic_write(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def read_scores_file(path: Path) -> ScoresFile:
    """The scores file at ``path``; a missing file or another kind of file is a BadInput."""
    from safetensors import safe_open

    from dpcli.io.weights import load_tensor_file

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"scores file not found: {path}")
    tensors = load_tensor_file(path)
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != SCORES_FORMAT:
        raise BadInput(f"{path} is not a dp score file")
    return ScoresFile(
        tensors=tensors,
        settings=json.loads(metadata["settings"]),
        model=metadata.get("model"),
        model_signature=metadata.get("model_signature"),
        cutoff=json.loads(metadata.get("cutoff", "null")),
        losses=json.loads(metadata.get("losses", "[]")),
    )
