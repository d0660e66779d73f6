"""dpcli-obd: Optimal Brain Damage importance for dp, accumulated over the Diff-Pruning timesteps.

OBD (LeCun et al., 1989) scores a weight by the loss increase its removal causes to second order,
½·h·w², with h the diagonal of the Hessian. Here h is the empirical Fisher over timesteps: the sum of
squared calibration-batch gradients g_t over t = 0..cutoff, the same timesteps Diff-Pruning keeps
(dp's shared scan, stopped by --threshold). A channel's score is Σ w²·h over its dependency group.
"""

from dpcli.criteria import Criterion
from dpcli.hookspecs import hookimpl

DEFAULT_THRESHOLD = 0.05  # as diff-taylor: stop the scan once the loss is below 5 % of its maximum


class OptimalBrainDamage(Criterion):
    name = "obd"
    description = "second-order OBD: Σ w²·Σ_t g_t² (diagonal Fisher over timesteps 0..cutoff)"
    needs_data = True
    needs_gradients = True
    squared_gradients = True  # the scan leaves Σ_t g_t² in .grad
    uses_threshold = True

    def scan_threshold(self, threshold):
        return DEFAULT_THRESHOLD if threshold is None else threshold

    def importance(self, threshold=None):
        import torch_pruning as tp

        # With nothing accumulated through its own accumulate_grad, HessianImportance reads .grad as
        # the Hessian diagonal and scores w²·h: exactly OBD over the Fisher the scan left there.
        return tp.importance.HessianImportance()


@hookimpl
def dpcli_register_criteria(register):
    register(OptimalBrainDamage())
