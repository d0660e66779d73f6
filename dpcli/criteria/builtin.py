"""The built-in criteria, registered through the same hook as third-party ones (entry point ``criteria``)."""

from __future__ import annotations

from dpcli.criteria.base import Criterion
from dpcli.hookspecs import hookimpl

DEFAULT_THRESHOLD = 0.05  # the authors' default for CIFAR-10 (paper: best threshold differs per data set)


class DiffTaylor(Criterion):
    name = "diff-taylor"
    description = "Diff-Pruning: Σ|w·g| over timesteps 0..cutoff, scan stops when loss < threshold × max loss"
    needs_data = True
    needs_gradients = True
    uses_threshold = True

    def scan_threshold(self, threshold):
        return DEFAULT_THRESHOLD if threshold is None else threshold

    def importance(self, threshold=None):
        import torch_pruning as tp

        return tp.importance.TaylorImportance(multivariable=False)


class Taylor(Criterion):
    name = "taylor"
    description = "first-order Taylor |Σ w·g| over all timesteps (the paper's Taylor baseline)"
    needs_data = True
    needs_gradients = True

    def importance(self, threshold=None):
        import torch_pruning as tp

        return tp.importance.TaylorImportance(multivariable=True)


class Magnitude(Criterion):
    name = "magnitude"
    description = "L2 norm of the weights (no data needed)"

    def importance(self, threshold=None):
        import torch_pruning as tp

        return tp.importance.MagnitudeImportance(p=2)


class Random(Criterion):
    name = "random"
    description = "random channel scores from --seed (baseline)"

    def importance(self, threshold=None):
        import torch_pruning as tp

        return tp.importance.RandomImportance()


class Reinit(Random):
    name = "reinit"
    description = "random pruning, then all weights re-initialised (train the small shape from scratch)"

    def finalize(self, model, seed):
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in model.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()


@hookimpl
def dpcli_register_criteria(register):
    for criterion in (DiffTaylor(), Taylor(), Magnitude(), Random(), Reinit()):
        register(criterion)
