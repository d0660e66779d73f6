"""JSON reading with a clear error, and writes that appear only when they succeed."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dpcli.errors import BadInput, BadSetting


def read_json(path: Path) -> Any:
    """The parsed JSON of ``path``; an unreadable or invalid file is a BadInput naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise BadInput(f"{path} is not valid JSON: {exc}") from None


@contextmanager
def atomic_write(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file name beside ``path``; it replaces ``path`` only if the block succeeds.

    ``suffix`` keeps an extension writers infer the format from (``.png`` for matplotlib)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{suffix}")
    try:
        yield temporary
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)


def prepare_output(output: Path, force: bool) -> None:
    """Refuse an existing non-empty output without --force (checked before any work is done)."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise BadInput(f"output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise BadSetting(
            "force",
            "output folder {output} exists and is not empty (use {force} to replace it)",
            output=output,
        )


class AtomicFolder:
    """Write into a temporary folder beside ``target``; it replaces ``target`` only on success."""

    def __init__(self, target: Path, force: bool = False):
        self.target = Path(target)
        self.force = force
        self.path: Path | None = None

    def __enter__(self) -> Path:
        prepare_output(self.target, self.force)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(
            tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".tmp", dir=self.target.parent)
        )
        return self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.path, 0o777 & ~umask)  # mkdtemp makes it private; the result should not be
        if self.target.exists():
            trash = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, trash)
            os.replace(self.path, self.target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.path, self.target)
