"""Sizes of a pruned model predicted from its kept widths, without copying or pruning the model.

Searching the ratio that meets ``--target-macs``/``--target-params`` used to copy, prune, trace and count
the whole model per trial (11 trials, 12 minutes and 13.9 GB for a Stable Diffusion 1.5 UNet). A trial
only needs the sizes, and those follow from the widths:

- the MACs of every module's own operators are measured once on the original model with fvcore
  (``MacsReport.self_by_operator``), and its parameters counted once;
- one torch-pruning pruner is built once; a trial re-runs its channel selection at the trial's ratio
  *without pruning* and counts how many output/input channels each module would keep;
- each module's MACs and parameters are scaled by its kept fractions: a convolution or linear layer by
  kept-out x kept-in (a depthwise convolution by kept-out), a normalisation by its kept channels,
  attention matmuls (``scaled_dot_product_attention``, ``bmm``, ...) by the kept query + value widths,
  an upsampling by its module's kept input channels.

Every operator fvcore counts in a diffusers or CompVis UNet has a rule, so the prediction is exact (the
tests compare it with fvcore on the really pruned model). A trial whose widths touch a module or operator
without a rule is not predicted (``predict`` returns None) and the search measures a pruned copy instead.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import torch

from dpcli.adapters.base import LoadedModel

# Operators whose MACs are attention products inside an attention module (not in a leaf layer).
_ATTENTION_OPERATORS = {"scaled_dot_product_attention", "bmm", "matmul", "baddbmm", "einsum"}
_UPSAMPLING_OPERATORS = {"upsample_nearest2d", "upsample_bilinear2d", "upsample_bicubic2d"}
_NORM_TYPES = (
    torch.nn.GroupNorm,
    torch.nn.LayerNorm,
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.modules.instancenorm._InstanceNorm,
)
# (query, value) child names of attention modules: diffusers, CompVis, transformers-style; or one fused qkv.
_ATTENTION_CHILDREN = (("to_q", "to_v"), ("q", "v"), ("query", "value"), ("q_proj", "v_proj"), ("qkv",))


@dataclass
class Widths:
    """Kept fractions of one trial: ``out(name)``, ``inp(name)`` (1.0 where nothing is removed)."""

    original: dict[str, dict]
    kept: dict[str, dict[str, int]]

    def fraction(self, name: str, side: str) -> Fraction:
        width = self.original.get(name, {}).get(f"{side}_channels")
        if not width:
            return Fraction(1)
        return Fraction(self.kept.get(name, {}).get(side, width), width)

    def out(self, name: str) -> Fraction:
        return self.fraction(name, "out")

    def inp(self, name: str) -> Fraction:
        return self.fraction(name, "in")

    def kept_out(self, name: str) -> int:
        width = self.original[name]["out_channels"]
        return self.kept.get(name, {}).get("out", width)


Rule = Callable[[Widths], Fraction]


def _layer_rule(name: str, module: torch.nn.Module) -> Rule | None:
    """How a leaf layer's own MACs and weight scale with its kept widths (None: no rule)."""
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        if module.groups > 1 and module.groups == module.in_channels:
            return lambda w: w.out(name)  # depthwise: one input channel per output channel
        return lambda w: w.out(name) * w.inp(name)
    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        return lambda w: w.out(name) * w.inp(name)
    if isinstance(module, _NORM_TYPES):
        return lambda w: w.out(name)
    return None


def _attention_rule(name: str, module: torch.nn.Module) -> Rule | None:
    """Attention products scale with query width + value width (Q·Kᵀ and A·V); None if not attention."""
    children = dict(module.named_children())
    for names in _ATTENTION_CHILDREN:
        if all(isinstance(children.get(n), (torch.nn.Linear, torch.nn.modules.conv._ConvNd)) for n in names):
            full = [f"{name}.{n}" if name else n for n in names]
            widths = [getattr(children[n], "out_channels", None) or children[n].out_features for n in names]

            def rule(w: Widths, full=full, widths=widths) -> Fraction:
                return Fraction(sum(w.kept_out(n) for n in full), sum(widths))

            return rule
    return None


def _input_rule(name: str, module: torch.nn.Module) -> Rule | None:
    """An operator on the module's input (an upsampling before its convolution) scales with the kept
    input channels of its first child layer; None without such a child."""
    for child_name, child in module.named_children():
        full = f"{name}.{child_name}" if name else child_name
        if isinstance(child, _NORM_TYPES):
            return lambda w, full=full: w.out(full)
        if isinstance(child, (torch.nn.modules.conv._ConvNd, torch.nn.Linear)):
            return lambda w, full=full: w.inp(full)
    return None


@dataclass
class _Term:
    amount: int
    rule: Rule | None  # None: constant while nothing it depends on changes (else the trial is not predicted)
    module: str
    has_layers: bool  # the module holds layers with widths: it changes only if one of them does
    what: str  # the operator or parameter


class SizePredictor:
    """Predicts (params, MACs) of the model pruned at a ratio, from one pruner and one fvcore count."""

    def __init__(self, loaded: LoadedModel, adapter, scores: dict[str, torch.Tensor], options, macs_report):
        from dpcli.io.model_format import layer_widths
        from dpcli.pruning import SavedImportance, build_pruner, module_names

        model = loaded.model
        self.names = module_names(model)
        self.widths = {name: layer_widths(module) for name, module in model.named_modules()}
        self.macs_terms = self._macs_terms(model, macs_report)
        self.params_terms = self._params_terms(model)
        self.base = (sum(t.amount for t in self.params_terms), macs_report.total)
        self._build = lambda ratio: build_pruner(
            loaded, adapter, SavedImportance(scores, self.names), ratio, options
        )
        self.pruner = self._build(0.0)
        # The pruner's per-run state, restored before each trial (head pruning changes num_heads).
        self._num_heads = dict(self.pruner.num_heads)
        self._out_groups = dict(self.pruner.out_channel_groups)

    @staticmethod
    def _macs_terms(model: torch.nn.Module, report) -> list[_Term]:
        terms = []
        for name, module in model.named_modules():
            for operator, amount in report.self_by_operator.get(name, {}).items():
                rule = _layer_rule(name, module)
                if rule is None and operator in _ATTENTION_OPERATORS:
                    rule = _attention_rule(name, module)
                if rule is None and operator in _UPSAMPLING_OPERATORS:
                    rule = _input_rule(name, module)
                terms.append(_Term(amount, rule, name, _has_layers(module), operator))
        return terms

    @staticmethod
    def _params_terms(model: torch.nn.Module) -> list[_Term]:
        terms = []
        for name, module in model.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                rule = _layer_rule(name, module)
                if rule is not None and param.ndim == 1 and not isinstance(module, _NORM_TYPES):
                    rule = (lambda w, name=name: w.out(name)) if param_name == "bias" else None
                terms.append(_Term(param.numel(), rule, name, _has_layers(module), param_name))
        return terms

    def kept_widths(self, ratio: float) -> tuple[dict[str, dict[str, int]], bool]:
        """Kept output/input channels per module at ``ratio`` (the pruner's own choice, nothing pruned),
        and whether a bare parameter would be pruned (its size is not predicted)."""
        from dpcli.pruning import group_removals

        if self.pruner.pruning_ratio_dict:
            # per-layer ratios were derived from the ratio it was built with: build one for this ratio
            self.pruner = None
            gc.collect()
            self.pruner = self._build(ratio)
        pruner = self.pruner
        pruner.num_heads.clear()
        pruner.num_heads.update(self._num_heads)
        pruner.out_channel_groups.clear()
        pruner.out_channel_groups.update(self._out_groups)
        pruner.per_step_pruning_ratio = pruner.iterative_pruning_ratio_scheduler(
            ratio, pruner.iterative_steps
        )
        pruner.current_step = 0
        removed: dict[str, dict[str, set[int]]] = {}
        bare = False
        for group in pruner.step(interactive=True):
            for name, side, indices in group_removals(pruner, group, self.names, self.widths):
                if name is None:
                    bare = True
                else:
                    removed.setdefault(name, {}).setdefault(side, set()).update(indices)
        kept = {
            name: {side: self.widths[name][f"{side}_channels"] - len(idx) for side, idx in sides.items()}
            for name, sides in removed.items()
        }
        return kept, bare

    def predict(self, ratio: float) -> tuple[int, int] | None:
        """(params, MACs) after pruning at ``ratio``; None where a changed module has no scaling rule."""
        kept, bare = self.kept_widths(ratio)
        if bare:
            return None
        widths = Widths(self.widths, kept)
        changed = set(kept)
        totals = []
        for terms in (self.params_terms, self.macs_terms):
            total = Fraction(0)
            for term in terms:
                if term.rule is not None:
                    total += term.amount * term.rule(widths)
                elif changed and (not term.has_layers or _touches(term.module, changed)):
                    return None
                else:
                    total += term.amount
            totals.append(round(total))
        return totals[0], totals[1]

    def close(self) -> None:
        """Drop the pruner (its dependency graph holds reference cycles)."""
        self.pruner = None
        gc.collect()


def _has_layers(module: torch.nn.Module) -> bool:
    from dpcli.io.model_format import layer_widths

    return any("out_channels" in layer_widths(m) for m in module.modules())


def _touches(module: str, changed: set[str]) -> bool:
    """Whether pruning changes ``module`` or anything inside it (the root "" contains everything)."""
    if not module:
        return bool(changed)
    return any(name == module or name.startswith(module + ".") for name in changed)


def size_predictor(
    loaded: LoadedModel, adapter, scores: dict[str, torch.Tensor], options, base: tuple[int, int]
) -> SizePredictor | None:
    """A predictor for ``loaded`` whose unpruned sizes equal ``base`` (params, MACs) as measured; None
    where they differ (a model whose counts the table does not reproduce is searched over copies)."""
    from dpcli.inspection import macs_of

    predictor = SizePredictor(loaded, adapter, scores, options, macs_of(loaded))
    if predictor.base != tuple(base):
        predictor.close()
        return None
    return predictor
