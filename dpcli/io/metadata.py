"""The ``dpcli.json`` of a saved model folder: its name, format tag and reader. Torch-free, so that the
model card (``dpcli.io.model_card``) and ``dp inspect``-style readers need not import the model format."""

from __future__ import annotations

from pathlib import Path

from dpcli.errors import BadInput
from dpcli.io.files import read_json

FORMAT = "dpcli-model"
FORMAT_VERSION = 1
METADATA_FILE = "dpcli.json"


def read_metadata(folder: Path) -> dict | None:
    """The dpcli.json of a saved model folder, or None when ``folder`` is not one."""
    file = Path(folder) / METADATA_FILE
    if not file.is_file():
        return None
    info = read_json(file)
    if info.get("format") != FORMAT:
        return None
    if int(info.get("format_version", 0)) > FORMAT_VERSION:
        raise BadInput(
            f"{folder} was written by a newer dpcli (format {info['format_version']}); upgrade dpcli"
        )
    return info
