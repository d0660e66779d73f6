"""Deprecated: the eval and compare jobs moved to ``dpcli.jobs.evaluate`` and ``dpcli.jobs.compare``."""

from dpcli._deprecated import moved_names

__getattr__ = moved_names(
    __name__, {"EvalSettings": "dpcli.jobs.evaluate", "evaluate": "dpcli.jobs.evaluate"}
)
