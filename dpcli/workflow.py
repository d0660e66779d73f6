"""Deprecated: the score and prune jobs moved to ``dpcli.jobs.score`` and ``dpcli.jobs.prune``."""

from __future__ import annotations

import warnings

from dpcli._deprecated import moved_names

__getattr__ = moved_names(
    __name__,
    {
        "ScoreSettings": "dpcli.jobs.score",
        "compute_scores": "dpcli.jobs.score",
        "PruneSettings": "dpcli.jobs.prune",
        "prune_model": "dpcli.jobs.prune",
        "pruned_metadata": "dpcli.jobs.prune",
    },
)


def adapter_of(loaded):
    """Deprecated: use ``loaded.adapter``."""
    warnings.warn(
        "dpcli.workflow.adapter_of is deprecated; use loaded.adapter", DeprecationWarning, stacklevel=2
    )
    return loaded.adapter
