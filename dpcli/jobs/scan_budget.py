"""The ``--scan-budget`` planner: how ``dp score`` and ``dp prune`` spend N forward samples on the timestep
scan (stride and calibration size), from a forward-only pilot scan that estimates the cutoff."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dpcli.adapters.base import LoadedModel
from dpcli.errors import BadSetting
from dpcli.runtime import Distributed
from dpcli.scoring import scan_calibration

if TYPE_CHECKING:
    from dpcli.jobs.score import ScoreSettings

# --scan-budget: how dp spends N forward samples (benchmarks/scan_budget.py, docs/benchmarks.md "Scan
# budget"). Agreement with a large-calibration scan depends far more on the calibration images than on
# scanning every timestep, until the stride reaches 32: so the budget goes to calibration images first, at
# the coarsest stride that kept agreement (16), and to finer strides only once the images reach
# BUDGET_MAX_CALIB (or the data runs out).
BUDGET_STRIDES = (16, 8, 4, 2, 1)
BUDGET_MIN_CALIB = 8
BUDGET_MAX_CALIB = 256
# The cost of a scan is (cutoff / stride + 1) × calibration images, and the cutoff is not known before: a
# forward-only pilot scan of PILOT_IMAGES images at stride BUDGET_STRIDES[0] estimates it.
PILOT_IMAGES = 16


@dataclass
class ScanPlan:
    """What ``--scan-budget`` chose: stride and calibration size, from the pilot's cutoff estimate."""

    scan_budget: int
    timestep_stride: int
    calib_size: int
    estimated_cutoff: int
    estimated_samples: int
    pilot_samples: int = 0

    def to_json(self) -> dict:
        return dict(vars(self))


def plan_scan(budget: int, estimated_cutoff: int, available: int | None = None) -> ScanPlan:
    """Stride and calibration size for a scan of about ``budget`` forward samples (the rule above).

    ``estimated_cutoff`` is the expected last scanned timestep; ``available`` caps the calibration size
    (the images in the data). A budget below ``BUDGET_MIN_CALIB`` images at the coarsest stride is an error.
    """
    most = min(BUDGET_MAX_CALIB, available) if available else BUDGET_MAX_CALIB

    def scanned(stride: int) -> int:
        return estimated_cutoff // stride + 1

    coarsest = BUDGET_STRIDES[0]
    least = min(BUDGET_MIN_CALIB, most) * scanned(coarsest)
    if budget < least:
        raise BadSetting(
            "scan_budget",
            "{scan_budget} is too small for this model and threshold: at least {least} forward samples "
            "({images} images × {steps} timesteps at stride {stride}, cutoff about t = {cutoff})",
            got=budget,
            least=least,
            images=min(BUDGET_MIN_CALIB, most),
            steps=scanned(coarsest),
            stride=coarsest,
            cutoff=estimated_cutoff,
        )
    calib = budget // scanned(coarsest)
    stride = coarsest
    if calib > most:
        calib = most
        stride = next(k for k in reversed(BUDGET_STRIDES) if calib * scanned(k) <= budget)
    return ScanPlan(budget, stride, calib, estimated_cutoff, calib * scanned(stride))


def plan_budget_scan(
    loaded: LoadedModel, adapter, settings: ScoreSettings, threshold: float, dist: Distributed | None = None
) -> ScanPlan:
    """Run the forward-only pilot scan and choose stride and calibration size for ``settings.scan_budget``.

    Under torchrun the pilot's images are shared out too and its losses summed: every process plans the
    same scan."""
    dist = dist or Distributed(device=next(loaded.model.parameters()).device)
    pilot, available = scan_calibration(
        loaded,
        adapter,
        settings,
        PILOT_IMAGES,
        threshold,
        dist,
        fit=True,
        stride=BUDGET_STRIDES[0],
        gradients=False,
    )
    # A pilot that ran to the last timestep says the scan will too; one that stopped at t stops the real
    # scan (finer stride, more images) at about t, a little earlier at most.
    estimated_cutoff = pilot.cutoff if pilot.stopped_early else pilot.timesteps - 1
    plan = plan_scan(settings.scan_budget, estimated_cutoff, available)
    plan.pilot_samples = pilot.samples_computed
    return plan
