"""Bad samples: examples that cannot be decoded, skipped, counted and reported instead of ending a run.

Policy (``DataSpec.on_bad_sample``, ``DataSpec.max_bad_fraction``):

- ``skip`` (default): a bad example is replaced by the next good one in the source's own order (index
  ``i + 1``, ``i + 2``, ... wrapping round), decided in the worker that decodes it. The replacement depends
  only on the data, never on what ran before, so batches keep their size, every process replaces the same
  way, and a resumed run reads exactly what an uninterrupted one read.
- ``fail``: the first bad example is an error naming it (exit 2).

``BadSampleLog`` is what the main process knows: the distinct bad examples met (by source and index), each
named once through ``on_warning`` when first met, with the step it was first met at. Once they exceed
``max_bad_fraction`` of the data set (of the examples seen, and only after the first
``UNKNOWN_LENGTH_GRACE``, for a source of unknown length) the log raises ``TooManyBadSamples``: a data set
that is mostly broken is a user error, not noise. Under torchrun each process's new entries are shared
with every process before any decision, so all processes stop (or go on) together.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dpcli.errors import BadInput, BadSetting

ON_BAD_SAMPLE = ("skip", "fail")
DEFAULT_ON_BAD_SAMPLE = "skip"
DEFAULT_MAX_BAD_FRACTION = 0.01
UNKNOWN_LENGTH_GRACE = 1000  # examples seen before the cap applies to a source of unknown length
_NAMED_IN_ERROR = 3


class BadExample(BadInput):
    """One example that cannot be used: ``where`` names it (a file, a shard member, a dataset row),
    ``reason`` says why. ``str()`` is the one line ``--on-bad-sample fail`` ends with."""

    def __init__(self, where: str, reason: str, what: str = "unreadable image"):
        self.where, self.reason = where, reason
        super().__init__(f"{what} {where}: {reason}")


@dataclass(frozen=True)
class BadSample:
    """A bad example as reports list it: ``source`` (file, shard member or row), ``reason``, and ``step``,
    the fine-tuning step (1-based, as the progress line counts) it was first met at; None outside
    fine-tuning (calibration images, FID reference images)."""

    source: str
    reason: str
    step: int | None
    index: int
    data: str

    def to_json(self) -> dict:
        return {"source": self.source, "reason": self.reason, "step": self.step}


def allowed_bad(total: int | None, fraction: float) -> int | None:
    """How many distinct bad examples a source of ``total`` examples may hold (None: unknown length)."""
    if total is None:
        return None
    return math.floor(fraction * total + 1e-9)


def _stderr_warning(message: str) -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
    except ImportError:  # pragma: no cover - torch is a dependency; the data layer imports it anyway
        pass
    print(f"Warning: {message}", file=sys.stderr, flush=True)


class BadSampleLog:
    """The bad samples one run met, per data source; raises ``TooManyBadSamples`` past the cap."""

    def __init__(self, on_warning: Callable[[str], None] | None = None):
        self.on_warning = on_warning or _stderr_warning
        self._entries: dict[tuple[str, int], BadSample] = {}
        self._rows: list[list] = []  # the entries as ``state()`` gives them, kept as they come
        self._seen: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> list[BadSample]:
        return list(self._entries.values())

    def count(self, data: str) -> int:
        return sum(1 for entry in self._entries.values() if entry.data == data)

    def record(self, entries, data: str, step: int | None = None, seen: int = 0) -> list[BadSample]:
        """Note ``entries`` (``(index, where, reason)``) met in ``data`` at ``step`` and ``seen`` more
        examples read; warn about each one not met before. Returns the new ones."""
        self._seen[data] = self._seen.get(data, 0) + seen
        new = []
        for index, where, reason in entries:
            key = (data, int(index))
            if key in self._entries:
                continue
            entry = BadSample(where, reason, step, int(index), data)
            self._entries[key] = entry
            self._rows.append([data, int(index), where, reason, step])
            new.append(entry)
            self.on_warning(f"skipped a bad sample {where}: {reason}")
        return new

    def check(self, data: str, total: int | None, fraction: float, checkpoint: str | None = None) -> None:
        """Raise ``TooManyBadSamples`` when the bad examples of ``data`` exceed ``fraction`` of ``total``
        (None: of the examples seen, once more than ``UNKNOWN_LENGTH_GRACE`` were)."""
        bad = [entry for entry in self._entries.values() if entry.data == data]
        if not bad:
            return
        if total is None:
            seen = self._seen.get(data, 0)
            if seen < UNKNOWN_LENGTH_GRACE or len(bad) <= fraction * seen:
                return
            raise TooManyBadSamples(bad, seen, fraction, seen_only=True, checkpoint=checkpoint)
        if len(bad) > allowed_bad(total, fraction):
            raise TooManyBadSamples(bad, total, fraction, checkpoint=checkpoint)

    def to_json(self) -> list[dict]:
        return [entry.to_json() for entry in self._entries.values()]

    def state(self) -> dict:
        """What a checkpoint keeps, so a resumed run goes on counting (and reporting) where it stopped
        (cheap: taken after every step; the entries list is shared, not copied)."""
        return {"entries": self._rows, "seen": dict(self._seen)}

    def load_state(self, state: dict | None) -> None:
        if not state:
            return
        for data, index, where, reason, step in state.get("entries", []):
            if (data, int(index)) not in self._entries:
                self._entries[(data, int(index))] = BadSample(where, reason, step, int(index), data)
                self._rows.append([data, int(index), where, reason, step])
        self._seen.update({data: int(count) for data, count in state.get("seen", {}).items()})


class TooManyBadSamples(BadSetting):
    """More distinct bad examples than ``max_bad_fraction`` allows (exit 2)."""

    def __init__(self, bad, total, fraction, seen_only=False, checkpoint=None):
        self.bad, self.total, self.fraction, self.seen_only = list(bad), total, fraction, seen_only
        first = ", ".join(f"{entry.source} ({entry.reason})" for entry in self.bad[:_NAMED_IN_ERROR])
        more = ", ..." if len(self.bad) > _NAMED_IN_ERROR else ""
        of = f"{total} images read" if seen_only else f"{total} images"
        saved = f"; checkpoint written to {checkpoint}" if checkpoint else ""
        super().__init__(
            "max_bad_fraction",
            "{count} of {of} are unreadable (over {percent} %): first ones {first}{more}; fix or remove "
            "them, or raise {max_bad_fraction}{saved}",
            count=len(self.bad),
            of=of,
            percent=f"{fraction * 100:g}",
            first=first,
            more=more,
            saved=saved,
        )

    def with_checkpoint(self, folder) -> TooManyBadSamples:
        """The same error, saying that a checkpoint to resume from was written to ``folder``."""
        return TooManyBadSamples(self.bad, self.total, self.fraction, self.seen_only, str(folder))


_current: contextvars.ContextVar[BadSampleLog | None] = contextvars.ContextVar("bad_sample_log", default=None)


def current_log() -> BadSampleLog:
    """The log of the run in progress (``recording``), or a fresh one that only warns on stderr."""
    log = _current.get()
    return log if log is not None else BadSampleLog()


@contextlib.contextmanager
def recording(log: BadSampleLog | None = None, on_warning=None) -> Iterator[BadSampleLog]:
    """Collect the bad samples that every data read inside the block meets into one log (a job's
    report lists them as ``bad_samples``)."""
    log = log or BadSampleLog(on_warning)
    token = _current.set(log)
    try:
        yield log
    finally:
        _current.reset(token)


def share(bad: list, rows: int, error: str | None, incomplete: bool) -> tuple[list, int, str | None, bool]:
    """Under torchrun, what every process met in its share of a batch, gathered on every process (the same
    everywhere): all bad entries, rows summed, the first error, whether any row ran out of examples. In one
    process, the arguments as they are."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return bad, rows, error, incomplete
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (bad, rows, error, incomplete))
    errors = [part[2] for part in gathered if part[2]]
    return (
        [entry for part in gathered for entry in part[0]],
        sum(part[1] for part in gathered),
        errors[0] if errors else None,
        any(part[3] for part in gathered),
    )


def check_policy(on_bad_sample: str, max_bad_fraction: float) -> None:
    if on_bad_sample not in ON_BAD_SAMPLE:
        raise BadSetting("on_bad_sample", "{on_bad_sample} must be skip or fail", got=repr(on_bad_sample))
    if not (isinstance(max_bad_fraction, (int, float)) and 0.0 <= max_bad_fraction <= 1.0):
        raise BadSetting("max_bad_fraction", "{max_bad_fraction} must be in [0, 1]", got=max_bad_fraction)
