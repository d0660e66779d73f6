"""Structural pruning with torch-pruning: scores per dependency group, a ratio or a searched target.

One path for every criterion: scores are first collected into a ``{group key: tensor}`` dict (computed
now or read from a ``dp score`` file), then the pruner ranks channels from that dict. So pruning from a
scores file gives exactly the weights that pruning with inline scoring gives.
"""

from __future__ import annotations

import copy
import fnmatch
import gc
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from dpcli.adapters.base import LoadedModel
from dpcli.errors import BadInput, BadSetting, DpError


def module_names(model: torch.nn.Module) -> dict[torch.nn.Module, str]:
    return {module: name for name, module in model.named_modules()}


def group_key(pruner, group, names: dict) -> str:
    """A stable name for a dependency group: its root module and whether outputs or inputs are pruned."""
    dep = group[0].dep
    side = "out" if pruner.DG.is_out_channel_pruning_fn(dep.handler) else "in"
    return f"{names.get(dep.target.module, '?')}:{side}"


class RecordingImportance:
    """Wraps an Importance and keeps every group's scores under its group key."""

    def __init__(self, inner, names: dict):
        self.inner = inner
        self.names = names
        self.pruner = None
        self.scores: dict[str, torch.Tensor] = {}

    def __call__(self, group):
        scores = self.inner(group)
        if scores is not None:
            self.scores[group_key(self.pruner, group, self.names)] = scores.detach().float().cpu().clone()
        return scores


class SavedImportance:
    """Serves scores recorded earlier; a group without scores means the scores belong to another model."""

    def __init__(self, scores: dict[str, torch.Tensor], names: dict):
        self.scores = scores
        self.names = names
        self.pruner = None

    def __call__(self, group):
        key = group_key(self.pruner, group, self.names)
        if key not in self.scores:
            raise BadInput(f"the scores have no entry for group {key}: they were computed for another model")
        scores = self.scores[key]
        expected = len(group[0].idxs)
        if scores.numel() != expected:
            raise BadInput(f"scores for {key} have {scores.numel()} channels, the model has {expected}")
        return scores.clone()


@dataclass
class PruneOptions:
    """How to prune, besides the criterion's scores."""

    ignore: list[str] = field(default_factory=list)
    round_to: int | None = None
    head_ratio: float = 0.0


def resolve_ignored(model: torch.nn.Module, patterns: list[str]) -> list[torch.nn.Module]:
    """Modules named by ``--ignore`` (exact names or shell-style patterns); each pattern must match."""
    named = dict(model.named_modules())
    chosen = []
    for pattern in patterns:
        matches = [module for name, module in named.items() if name and fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            raise BadSetting(
                "ignore",
                "{ignore} {pattern} matches no module (see dp inspect for names)",
                pattern=repr(pattern),
            )
        chosen.extend(matches)
    return chosen


def build_pruner(loaded: LoadedModel, adapter, importance, ratio: float, options: PruneOptions):
    """A torch-pruning pruner over ``loaded.model`` with the adapter's ignored layers and head grouping."""
    import torch_pruning as tp

    model = loaded.model
    ignored = list(adapter.ignored_layers(loaded)) + resolve_ignored(model, options.ignore)
    extra = adapter.pruner_options(loaded)
    example = adapter.example_inputs(loaded, batch_size=1)
    with keeping_no_activations():
        pruner = tp.pruner.BasePruner(
            model,
            example,
            importance=importance,
            pruning_ratio=ratio,
            ignored_layers=ignored,
            round_to=options.round_to,
            num_heads=extra.get("num_heads", {}),
            out_channel_groups=dict(extra.get("out_channel_groups", {})),
            prune_num_heads=options.head_ratio > 0,
            head_pruning_ratio=options.head_ratio,
            forward_fn=lambda m, inputs: adapter.predict(loaded, *inputs),
        )
    importance.pruner = pruner
    return pruner


@contextmanager
def keeping_no_activations():
    """Autograd saves no tensor for the backward inside this block.

    torch-pruning finds the dependencies by tracing the autograd graph of one forward and keeps that
    graph (every operator's ``grad_fn``) as long as the pruner lives; it reads the operators' saved sizes
    and dims, never their saved tensors. Without this, the tracing forward's activations live on with
    the pruner: for SDXL at 512 px about 5 GB more during the search and again while pruning."""

    def pack(tensor: torch.Tensor) -> None:
        return None

    def unpack(packed: None) -> torch.Tensor:
        raise DpError("the dependency-tracing forward kept no activations: it cannot be backpropagated")

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def collect_scores(
    loaded: LoadedModel, adapter, criterion, threshold: float | None, seed: int, options: PruneOptions
) -> dict[str, torch.Tensor]:
    """Every prunable group's channel scores under ``criterion`` (gradients must already be in ``.grad``)."""
    names = module_names(loaded.model)
    recorder = RecordingImportance(criterion.importance(threshold), names)
    pruner = build_pruner(loaded, adapter, recorder, 0.5, options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in pruner.step(interactive=True):
            pass  # importance is computed for every group before the first one is yielded
    recorder.pruner = None
    del pruner
    gc.collect()  # free the dependency graph (reference cycles) before the caller goes on
    if not recorder.scores:
        raise BadInput("nothing in this model can be pruned (every layer is ignored or too narrow)")
    return recorder.scores


def prune_in_place(
    loaded: LoadedModel,
    adapter,
    scores: dict[str, torch.Tensor],
    ratio: float,
    options: PruneOptions,
    select: Callable | None = None,
) -> dict[str, dict[str, list[int]]]:
    """Remove channels from ``loaded.model`` at ``ratio`` per layer, ranked by ``scores``; fix attributes.
    ``select(pruner)``, when given, yields the groups to prune instead (``dpcli.layout``'s fixed widths).

    Returns the kept channels of every module pruning changed (see ``kept_channels``)."""
    from dpcli.io.model_format import layer_widths

    model = loaded.model
    names = module_names(model)
    widths = {name: layer_widths(module) for name, module in model.named_modules()}
    pruner = build_pruner(loaded, adapter, SavedImportance(scores, names), ratio, options)
    # The original channels each (module, side) still has. A group's indices are positions in the
    # module's width at the time it is pruned: a norm or conv over a concatenation is cut by one group
    # per input, the second one after the first has already shrunk it.
    alive: dict[str, dict[str, list[int]]] = {}
    originals = dict(model.named_parameters())
    group = None
    for group in pruner.step(interactive=True) if select is None else select(pruner):
        positions: dict[tuple[str, str], set[int]] = {}
        for name, side, indices in group_removals(pruner, group, names, widths):
            if name is not None:  # None: a bare nn.Parameter
                positions.setdefault((name, side), set()).update(indices)
        for (name, side), removed_now in positions.items():
            current = alive.setdefault(name, {}).setdefault(
                side, list(range(widths[name][f"{side}_channels"]))
            )
            alive[name][side] = [c for i, c in enumerate(current) if i not in removed_now]
        group.prune()
        release_replaced(model, originals)
    removed = {
        name: {side: set(range(widths[name][f"{side}_channels"])) - set(kept) for side, kept in sides.items()}
        for name, sides in alive.items()
    }
    adapter.fix_pruned_modules(loaded, pruner)
    model.zero_grad(set_to_none=True)
    del pruner, group
    gc.collect()  # the dependency graph (reference cycles) goes now, not at some later collection
    return kept_channels(model, widths, removed)


def release_replaced(model: torch.nn.Module, originals: dict[str, torch.nn.Parameter]) -> None:
    """Free the storage of each parameter in ``originals`` that pruning has replaced in ``model``.

    torch-pruning swaps a pruned layer's weight for a new, narrower Parameter; the old one stays referenced
    by the traced autograd graph the pruner keeps (its AccumulateGrad nodes) until the pruner goes. Without
    this, the whole unpruned model lives beside the pruned one until the end (10.3 GB beside 5.3 GB for
    SDXL in float32); with it, only the layer being pruned is held twice."""
    current = dict(model.named_parameters())
    for name in [name for name, parameter in originals.items() if current.get(name) is not parameter]:
        parameter = originals.pop(name)
        parameter.data = torch.empty(0, dtype=parameter.dtype, device=parameter.device)


_NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.modules.batchnorm._BatchNorm)


def group_removals(pruner, group, names: dict, widths: dict[str, dict]):
    """``(module name, side, removed indices)`` for each module a pruning group changes; a bare
    ``nn.Parameter`` gives the name ``None`` (operators such as additions are left out). The indices are
    positions in the module's width when the group is yielded: the original width while nothing has been
    pruned (``dpcli.macs_table``), the width left by earlier groups while pruning (``prune_in_place``)."""
    from torch_pruning._helpers import to_plain_idxs

    for dependency, indices in group.items:
        target = dependency.target.module
        name = names.get(target)
        if name is None:
            if isinstance(target, torch.nn.Parameter):
                yield None, "param", to_plain_idxs(indices)
            continue
        out = pruner.DG.is_out_channel_pruning_fn(dependency.handler)
        side = "out" if out or "in_channels" not in widths[name] else "in"
        if isinstance(dependency.target.module, _NORMS):
            side = "out"  # one width: the channels
        yield name, side, to_plain_idxs(indices)


def kept_channels(
    model: torch.nn.Module, widths: dict[str, dict], removed: dict[str, dict[str, set[int]]]
) -> dict[str, dict[str, list[int]]]:
    """``{module: {"out": kept output channels, "in": kept input channels, "heads": kept heads}}`` for the
    modules whose widths pruning changed, as indices into the widths before pruning (``widths``)."""
    kept: dict[str, dict[str, list[int]]] = {}
    for name, sides in sorted(removed.items()):
        for side, indices in sorted(sides.items()):
            width = widths[name][f"{side}_channels"]
            if indices:
                kept.setdefault(name, {})[side] = [i for i in range(width) if i not in indices]
    for name, module in model.named_modules():
        heads_before = widths.get(name, {}).get("heads")
        query = kept.get(f"{name}.to_q", {}).get("out")
        if heads_before and query is not None and int(module.heads) != heads_before:
            head_dim = widths[f"{name}.to_q"]["out_channels"] // heads_before
            heads = sorted({i // head_dim for i in query})
            if len(heads) != int(module.heads):
                raise DpError(f"{name}: the kept query channels do not match its {module.heads} heads")
            kept[name] = {"heads": heads}
    return kept


@dataclass
class Trial:
    ratio: float
    params: int
    macs: int


def prune_to_target(
    loaded: LoadedModel,
    adapter,
    scores,
    measure: Callable[[LoadedModel], tuple[int, int]],
    base: tuple[int, int],
    options: PruneOptions,
    ratio: float | None = None,
    target_macs: float | None = None,
    target_params: float | None = None,
    tolerance: float = 0.05,
    on_trial: Callable[[Trial], None] | None = None,
) -> tuple[float, list[Trial], dict[str, dict[str, list[int]]]]:
    """Prune ``loaded`` in place at ``ratio``, or at the ratio whose result is closest to a target fraction.

    GroupNorm groups quantise what a ratio gives, so a target is searched by bisection on the ratio. A
    trial's sizes are predicted from the widths the pruner would keep (``dpcli.macs_table``), without
    copying the model; a trial the widths cannot predict measures a pruned copy. Returns the ratio used,
    the trials made and the kept channels (``kept_channels``). ``measure`` gives (params, macs).
    """
    if ratio is not None:
        return ratio, [], prune_in_place(loaded, adapter, scores, ratio, options)
    from dpcli.macs_table import size_predictor

    index = 1 if target_macs is not None else 0
    target = target_macs if target_macs is not None else target_params
    trials: dict[float, Trial] = {}
    predictor = size_predictor(loaded, adapter, scores, options, base)

    def trial(r: float) -> Trial:
        r = round(r, 4)
        if r not in trials:
            sizes = predictor.predict(r) if predictor is not None else None
            if sizes is None:
                candidate = copy.copy(loaded)
                candidate.model = copy.deepcopy(loaded.model)
                prune_in_place(candidate, adapter, scores, r, options)
                sizes = measure(candidate)
                # torch-pruning's dependency graph holds reference cycles: without a collection, several
                # pruned copies of the model stay alive at once (5 x 3.4 GB for a Stable Diffusion UNet).
                del candidate
                gc.collect()
            params, macs = sizes
            trials[r] = Trial(r, params, macs)
            if on_trial is not None:
                on_trial(trials[r])
        return trials[r]

    def fraction(t: Trial) -> float:
        return (t.params, t.macs)[index] / base[index]

    # The achieved size is a step function of the ratio, and not monotone near the top (a group that
    # would lose every channel is left whole): bracket the target on a coarse grid, then bisect inside.
    grid = [round(0.1 * i, 1) for i in range(10)]
    bracket = None
    for low, high in zip(grid, grid[1:], strict=False):
        if fraction(trial(low)) > target >= fraction(trial(high)):
            bracket = (low, high)
            break
    if bracket is None:
        best = min((trial(r) for r in grid), key=lambda t: abs(fraction(t) - target))
    else:
        low, high = bracket
        while high - low > 2e-3:
            middle = (low + high) / 2
            if fraction(trial(middle)) > target:
                low = middle
            else:
                high = middle
        best = min((trial(low), trial(high)), key=lambda t: abs(fraction(t) - target))
    achieved = fraction(best)
    if abs(achieved - target) > tolerance * target:
        what = "MACs" if index else "params"
        reachable = sorted({round(fraction(t), 3) for t in trials.values()})
        raise BadInput(
            f"target {what} {target:.3f} cannot be reached within {tolerance:.0%}: the closest is "
            f"{achieved:.3f} (ratio {best.ratio}); reachable fractions seen: {reachable}"
        )
    if predictor is not None:
        predictor.close()
    kept = prune_in_place(loaded, adapter, scores, best.ratio, options)
    return best.ratio, sorted(trials.values(), key=lambda t: t.ratio), kept


def output_shape(loaded: LoadedModel, adapter) -> tuple[int, ...]:
    """The shape of one forward at the native size; a model that cannot run is a runtime failure."""
    inputs = adapter.example_inputs(loaded, batch_size=1)
    try:
        with torch.no_grad():
            return tuple(adapter.predict(loaded, *inputs).shape)
    except Exception as exc:
        raise DpError(f"the model fails its forward pass: {type(exc).__name__}: {exc}") from exc
