"""The criterion contract (kept free of heavy imports: criteria are discovered on every command)."""

from __future__ import annotations

from typing import Any


class Criterion:
    """Base class for importance criteria.

    Attributes:
        name: the value users pass to ``--criterion``.
        description: one line for ``dp plugins`` and the interactive picker.
        needs_data: the criterion needs calibration images (``--data``).
        needs_gradients: the shared timestep scan must accumulate gradients before scoring.
        uses_threshold: ``--threshold`` means something to this criterion.
        squared_gradients: with ``needs_gradients``, the scan leaves Σ_t g_t⊙g_t in ``.grad`` instead of
            Σ_t g_t, where g_t is the calibration-batch gradient at timestep t: the diagonal empirical
            Fisher over the scanned timesteps, for second-order (OBD-style) criteria. The scan then runs
            one timestep per backward pass.
    """

    name: str = ""
    description: str = ""
    needs_data: bool = False
    needs_gradients: bool = False
    uses_threshold: bool = False
    squared_gradients: bool = False

    def scan_threshold(self, threshold: float | None) -> float:
        """The loss-ratio threshold at which the timestep scan stops (0 scans every timestep)."""
        return 0.0

    def importance(self, threshold: float | None = None) -> Any:
        """A torch-pruning ``Importance`` (callable on a dependency group, returning one score per channel)."""
        raise NotImplementedError

    def finalize(self, model: Any, seed: int) -> None:
        """Hook run on the pruned model (``reinit`` re-initialises weights here)."""
