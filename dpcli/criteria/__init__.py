"""Importance criteria: small objects that turn a model (and accumulated gradients) into channel scores.

A criterion says what it needs (``needs_data``, ``needs_gradients``, ``scan_threshold``) and hands
torch-pruning an ``Importance``; the timestep scan that produces the gradients lives in
``dpcli.scoring`` and is shared by every gradient criterion.
"""

from dpcli.criteria.base import Criterion

__all__ = ["Criterion"]
