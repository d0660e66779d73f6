"""JSON reading with a clear error, writes that appear only when they succeed, and the output lock.

Every write of an output goes through ``atomic_write`` (a file) or ``AtomicFolder`` (a folder): a failed
write (a full disk, a quota, a read-only or vanished file system) leaves the previous output as it was,
removes its temporary file or folder, and becomes one ``WriteFailed`` line with exit code 1.
``output_lock`` makes one process at a time the writer of an output.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dpcli.errors import BadInput, BadSetting, DpError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class WriteFailed(DpError):
    """Writing an output failed (disk full, quota, I/O error); nothing was half-written (exit code 1)."""


def write_failure(exc: OSError, target: Path) -> WriteFailed:
    """The one-line error for an OSError raised while writing ``target``."""
    if exc.errno in _DISK_FULL:
        return WriteFailed(
            f"no space left on the device writing {target} ({errno.errorcode[exc.errno]}): "
            "it was left as it was; free some space and run again"
        )
    reason = exc.strerror or str(exc) or type(exc).__name__
    return WriteFailed(f"cannot write {target} ({reason}): it was left as it was")


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
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise write_failure(exc, path) from exc
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


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
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(
                tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".tmp", dir=self.target.parent)
            )
        except OSError as exc:
            raise write_failure(exc, self.target) from exc
        return self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            if isinstance(exc, OSError) and not isinstance(exc, DpError):
                raise write_failure(exc, self.target) from exc
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


def final_name(path: Path) -> str:
    """The name ``path`` will have once written: the target's name for an ``AtomicFolder``'s temporary
    folder (``.NAME.XXXXXXXX.tmp``), else its own name."""
    match = re.fullmatch(r"\.(.+)\.\w{8}\.tmp", Path(path).name)
    return match.group(1) if match else Path(path).name


# The output lock -------------------------------------------------------------------------------

# A file system that cannot lock (some Lustre or SMB mounts) answers lockf with one of these.
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def lock_path(target: Path) -> Path:
    """The lock file of the output ``target`` (a folder or a file): ``.NAME.lock`` beside it, so it
    survives the rename that puts a new output in place."""
    target = Path(target).absolute()
    return target.with_name(f".{target.name}.lock")


def _holder(fd: int) -> str:
    """What the lock file says about its holder: ``PID HOST``, or '' while it is being written."""
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 256).decode(errors="replace").strip()


def _describe(holder: str) -> str:
    pid, _, host = holder.partition(" ")
    if not pid:
        return "another dp process"
    return f"process {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


@contextmanager
def output_lock(target: Path, on_note: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the exclusive lock of the output ``target`` for the block: a second writer of the same output
    gets a BadInput (exit 2) naming the holder's PID, whatever ``--force`` says.

    The lock is a POSIX lock (``lockf``) on ``.NAME.lock`` beside the output, holding ``PID HOST``. The kernel (or the
    NFS lock manager) releases it when its process dies, however it dies, so a lock file left by a killed
    run is taken over, with a note through ``on_note``. On a file system without locks the run goes on
    unlocked, with a note. In a torchrun job only global rank 0 writes outputs, and only it locks.
    """
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    path = lock_path(target)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, target)
    except OSError as exc:
        if exc.errno not in _NO_LOCKS:
            raise write_failure(exc, path) from exc
        if on_note is not None:
            on_note(f"the file system of {target} does not support locks; concurrent runs are not detected")
        yield
        return
    try:
        stale = _holder(fd)
        if stale and on_note is not None:
            on_note(f"took over the lock of {target} left by {_describe(stale)}, which is no longer running")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        if stale:
            _remove_abandoned_writes(Path(target), on_note)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding it: a waiter that opened it sees it is gone
        os.close(fd)


def _remove_abandoned_writes(target: Path, on_note: Callable[[str], None] | None) -> None:
    """Remove what a killed writer of ``target`` left beside it: the temporary folder or file of a write
    that never finished, and the old output of a replacement that was not cleaned up. A temporary folder
    holding the run's checkpoints (a fine-tune killed while moving its result into place) is kept."""
    target = Path(target).absolute()
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:\w{{8}}\.tmp|tmp(?:\.\w+)?|old-\d+)")
    for path in target.parent.iterdir():
        if not pattern.fullmatch(path.name):
            continue
        holds_checkpoints = path.is_dir() and (path / "checkpoints").is_dir()
        if holds_checkpoints or (".old-" in path.name and not target.exists()):
            if on_note is not None:
                on_note(f"{path} is left from an interrupted write of {target}; check it, then remove it")
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _acquire(path: Path, target: Path) -> int:
    """An open descriptor of ``path`` holding its exclusive lock, or BadInput when another holds it.

    A POSIX record lock (``lockf``), not ``flock``: child processes forked while it is held (DataLoader
    workers) do not inherit it, so a SIGKILLed run's lock is gone at once, not when its last worker exits.
    (Closing any descriptor of the lock file in the holding process would release it: nothing else opens it.)
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            holder = _describe(_holder(fd))
            os.close(fd)
            raise BadInput(
                f"{target} is being written by {holder}; wait for it to end or choose another output"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same_file = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            return fd
        os.close(fd)  # its holder removed it between our open and our lock: lock the new one
