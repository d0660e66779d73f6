"""Layouts of a pruned model: ``free`` (per-layer widths) and ``diffusers`` (a real diffusers config).

``free`` is what torch-pruning gives: every dependency group loses the same fraction of its channels,
so widths differ from layer to layer and only dp can rebuild the model (from the widths in dpcli.json).

``diffusers`` gives every UNet level ONE width, shared by the level's residual stream and the internal
width of each of its resnets, attention blocks and resamplers, as a diffusers config describes it
(``block_out_channels``). The pruned weights are then exactly those of ``Class.from_config(config)``, so
plain ``from_pretrained`` loads them. The constraints:

- a level's width divides by the norm groups (``norm_num_groups``, ``attn_norm_num_groups``), by its
  attention head count (kept: the head width shrinks), and by ``round_to``;
- levels of equal original width keep equal widths (their residual streams are one dependency group
  when no shortcut convolution separates them);
- widths keep the integer ratios to the first level (``channel_mult``, which shape-inferring loaders
  assume) whenever such widths reach the target, else each level is rounded on its own;
- the time embedding keeps its width: ``time_embedding_dim`` is written into the config. Only the
  sinusoidal projection shrinks with the first level (diffusers ties its size to
  ``block_out_channels[0]``): the first linear layer keeps the input columns of the original
  frequencies nearest to the smaller sinusoid's (exact when the frequency grids nest, else an
  approximation that fine-tuning absorbs; the report says which);
- cross-attention inputs (the text width) are untouched.

Channels are still chosen by the criterion: each dependency group keeps the channels its scores rank
highest, with torch-pruning's own channel grouping (norm groups, heads, GEGLU halves); only the number
kept is set by the level's width.
"""

from __future__ import annotations

import copy
import gc
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dpcli.adapters.base import LoadedModel
from dpcli.errors import BadInput, BadSetting, DpError

LAYOUTS = ("free", "diffusers")
CLASSES = ("UNet2DModel", "UNet2DConditionModel")
# Modules fed by the sinusoidal time projection, whose input columns follow the frequencies kept.
TIME_INPUTS = ("time_embedding.linear_1", "class_embedding.linear_1")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise BadSetting("layout", "{layout} must be one of " + ", ".join(LAYOUTS), got=repr(layout))


def _class_name(model: torch.nn.Module) -> str:
    return type(model).__name__


def check_supported(loaded: LoadedModel, options) -> None:
    """The diffusers layout needs a diffusers UNet and no option that breaks its one-width-per-level rule."""
    name = _class_name(loaded.model)
    if name not in CLASSES or not hasattr(loaded.model, "config"):
        raise BadSetting(
            "layout",
            "{layout} diffusers needs a diffusers UNet2DModel or UNet2DConditionModel, not {name}",
            name=name,
        )
    if options.ignore:
        raise BadSetting("layout", "{ignore} keeps layers whole, which {layout} diffusers cannot express")
    if options.head_ratio:
        raise BadSetting("layout", "{head_ratio} is not supported with {layout} diffusers (heads are kept)")
    config = dict(loaded.model.config)
    from dpcli.io.model_format import module_shapes

    described = build(loaded.model, {k: v for k, v in config.items() if not k.startswith("_")}, "meta")
    if module_shapes(described) != module_shapes(loaded.model):
        raise BadSetting(
            "layout",
            "{layout} diffusers needs a model whose widths its config describes: this one was pruned in the "
            "free layout (prune the original instead)",
        )
    if config.get("time_embedding_type", "positional") != "positional":
        raise BadSetting(
            "layout",
            "{layout} diffusers supports positional time embeddings, not {kind}",
            kind=repr(config.get("time_embedding_type")),
        )


def level_of(name: str, levels: int) -> int | None:
    """The UNet level a module belongs to (down block i and up block levels-1-i share level i)."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "up_blocks":
        return levels - 1 - int(parts[1])
    if parts[0] == "mid_block":
        return levels - 1
    if parts[0] in ("conv_in", "conv_norm_out", "conv_out"):
        return 0
    return None


def attention_heads(model: torch.nn.Module) -> dict[str, int]:
    from dpcli.adapters.diffusers_fixes import attention_modules

    return {name: int(module.heads) for name, module in attention_modules(model)}


def alignments(model: torch.nn.Module, round_to: int | None) -> list[int]:
    """Per level, the number every width of that level must divide by."""
    config = dict(model.config)
    widths = list(config["block_out_channels"])
    aligned = [math.lcm(int(config.get("norm_num_groups") or 1), round_to or 1) for _ in widths]
    if config.get("attn_norm_num_groups"):
        aligned = [math.lcm(a, int(config["attn_norm_num_groups"])) for a in aligned]
    for name, heads in attention_heads(model).items():
        level = level_of(name, len(widths))
        if level is not None:
            aligned[level] = math.lcm(aligned[level], heads)
    # levels of equal original width share one width (and so one alignment)
    for i, width in enumerate(widths):
        for j, other in enumerate(widths):
            if width == other:
                aligned[i] = math.lcm(aligned[i], aligned[j])
    return aligned


def level_widths(original: list[int], aligned: list[int], keep: float, ratios: bool) -> list[int] | None:
    """Widths keeping about ``keep`` of each level's channels, multiples of ``aligned``; with ``ratios``
    each level keeps its integer multiple of the first level's width (None where that is impossible)."""

    def rounded(value: float, step: int, limit: int) -> int:
        return min(limit, max(step, round(value / step) * step))

    first = rounded(keep * original[0], aligned[0], original[0])
    if not ratios:
        return [first] + [rounded(keep * c, a, c) for c, a in zip(original[1:], aligned[1:], strict=True)]
    widths = [first]
    for width, step in zip(original[1:], aligned[1:], strict=True):
        if width % original[0]:
            return None
        scaled = first * width // original[0]
        if scaled % step or scaled > width:
            return None
        widths.append(scaled)
    return widths


def layout_config(model: torch.nn.Module, widths: list[int]) -> dict:
    """The diffusers config of ``model`` with level widths ``widths`` (see the module docstring)."""
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    config["_class_name"] = _class_name(model)
    config["block_out_channels"] = list(widths)
    config["time_embedding_dim"] = int(model.time_embedding.linear_2.out_features)
    head_dim = config.get("attention_head_dim")
    if _class_name(model) == "UNet2DModel" and isinstance(head_dim, int):
        # one head width for every level: the kept head counts decide it
        original = list(model.config.block_out_channels)
        widths_per_head = set()
        for name, heads in attention_heads(model).items():
            level = level_of(name, len(original))
            widths_per_head.add(widths[level] // heads if level is not None else None)
        if len(widths_per_head) > 1 or None in widths_per_head:
            return {}
        if widths_per_head:
            config["attention_head_dim"] = widths_per_head.pop()
    for key, value in list(config.items()):
        if isinstance(value, tuple):
            config[key] = list(value)
    return config


def build(model: torch.nn.Module, config: dict, device: str | torch.device = "cpu") -> torch.nn.Module:
    """``type(model).from_config(config)`` on ``device`` (``meta``: shapes only), in ``model``'s dtype."""
    cls = type(model)
    dtype = next(model.parameters()).dtype
    with torch.device(device):
        built = cls.from_config({k: v for k, v in config.items() if k != "_class_name"})
    if next(built.parameters()).dtype != dtype:  # (diffusers warns on every .to(dtype))
        built = built.to(dtype=dtype)
    return built.eval()


@dataclass
class Plan:
    """One candidate: level widths, the config that describes them, and its size when measured."""

    keep: float
    widths: list[int]
    ratios: bool
    config: dict
    params: int = 0
    macs: int = 0


def _plans(model: torch.nn.Module, round_to: int | None):
    """Candidate plans: those keeping channel_mult integer ratios, the per-level rounded grid, and the
    function making the plan for one kept fraction (None where no valid layout has those widths)."""
    original = list(model.config.block_out_channels)
    aligned = alignments(model, round_to)
    heads = attention_heads(model)

    def plan(keep: float, ratios: bool) -> Plan | None:
        widths = level_widths(original, aligned, keep, ratios)
        if widths is None or widths == original:
            return None
        config = layout_config(model, widths)
        if not config:
            return None
        shapes_only = build(model, config, "meta")
        if attention_heads(shapes_only) != heads:
            return None
        return Plan(keep, widths, ratios, config)

    def unique(plans):
        seen, result = set(), []
        for p in plans:
            if p is not None and tuple(p.widths) not in seen:
                seen.add(tuple(p.widths))
                result.append(p)
        return result

    with_ratios = unique(
        plan(k * aligned[0] / original[0], True) for k in range(1, original[0] // aligned[0])
    )
    grid = unique(plan(k / 64, False) for k in range(1, 64))
    return with_ratios, grid, plan


def _measure_plan(loaded: LoadedModel, plan: Plan, measure) -> Plan:
    candidate = copy.copy(loaded)
    candidate.model = build(loaded.model, plan.config, next(loaded.model.parameters()).device)
    plan.params, plan.macs = measure(candidate)
    del candidate
    gc.collect()
    return plan


def choose_plan(
    loaded: LoadedModel,
    measure: Callable[[LoadedModel], tuple[int, int]],
    base: tuple[int, int],
    round_to: int | None,
    ratio: float | None,
    target_macs: float | None,
    target_params: float | None,
    tolerance: float,
    on_trial=None,
) -> tuple[Plan, list[Plan]]:
    """The level widths for ``ratio`` (channels removed per level) or the plan closest to a target
    fraction; plans keeping channel_mult ratios win whenever they land within ``tolerance``."""
    from dpcli.pruning import Trial

    with_ratios, grid, make_plan = _plans(loaded.model, round_to)
    if not with_ratios and not grid:
        raise BadInput("no smaller diffusers layout exists for this model (its levels are at their minimum)")
    measured: list[Plan] = []

    def size(plan: Plan) -> Plan:
        if plan not in measured:
            _measure_plan(loaded, plan, measure)
            measured.append(plan)
            if on_trial is not None:
                on_trial(Trial(round(1 - plan.keep, 4), plan.params, plan.macs))
        return plan

    if ratio is not None:
        chosen = make_plan(1 - ratio, True) or make_plan(1 - ratio, False)
        if chosen is None:
            raise BadInput(
                f"no diffusers layout keeps {1 - ratio:.2f} of each level's channels (the widths would "
                "stay as they are, or not divide into the heads); try another ratio"
            )
        return size(chosen), measured
    index = 1 if target_macs is not None else 0
    target = target_macs if target_macs is not None else target_params

    def fraction(plan: Plan) -> float:
        return (plan.params, plan.macs)[index] / base[index]

    for plan in with_ratios:
        size(plan)
    low, high = 0, len(grid) - 1  # grid plans grow with keep: bisect for the target
    while high - low > 1:
        middle = (low + high) // 2
        if fraction(size(grid[middle])) > target:
            high = middle
        else:
            low = middle
    for plan in grid[low : high + 1]:
        size(plan)
    within = [p for p in measured if abs(fraction(p) - target) <= tolerance * target]
    preferred = [p for p in within if p.ratios] or within
    if not preferred:
        best = min(measured, key=lambda p: abs(fraction(p) - target))
        what = "MACs" if index else "params"
        reachable = sorted({round(fraction(p), 3) for p in measured})
        raise BadInput(
            f"target {what} {target:.3f} cannot be reached within {tolerance:.0%} in the diffusers "
            f"layout: the closest is {fraction(best):.3f} (widths {best.widths}); seen: {reachable}"
        )
    return min(preferred, key=lambda p: abs(fraction(p) - target)), measured


def group_selector(target: dict[str, dict]):
    """For ``prune_in_place``: every dependency group cut to the width its root module has in ``target``
    (module shapes of the layout's model), keeping the channels its scores rank highest."""

    def select(pruner):
        names = {module: name for name, module in pruner.model.named_modules()}
        graph = pruner.DG
        groups = graph.get_all_groups(
            ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
        )
        for group in groups:
            is_attention, _ = pruner._is_atten_group(group)
            if is_attention:
                group = pruner._downstream_node_as_root_if_attention(group)
                if group is None:
                    continue
            module = group[0].dep.target.module
            handler = group[0].dep.handler
            out = graph.is_out_channel_pruning_fn(handler)
            current = graph.get_out_channels(module) if out else graph.get_in_channels(module)
            name = names.get(module)
            wanted = target.get(name, {}).get("out_channels" if out else "in_channels")
            if current is None or wanted is None or wanted == current:
                continue
            channel_groups = pruner._get_channel_groups(group)
            scores = pruner.estimate_importance(group)
            if scores is None or current % channel_groups or wanted % channel_groups:
                raise DpError(
                    f"{name}: {current} -> {wanted} channels do not split into {channel_groups} groups"
                )
            per_group = scores.view(channel_groups, -1).mean(dim=0).cpu()
            size = per_group.numel()
            removed = torch.argsort(per_group)[: size - wanted // channel_groups]
            indices = torch.cat([removed + g * size for g in range(channel_groups)]).sort().values
            pruned = graph.get_pruning_group(module, handler, indices.tolist())
            if graph.check_pruning_group(pruned):
                yield pruned

    return select


def time_columns(original: int, kept: int, shift: float) -> list[int] | None:
    """Input columns of the time embedding's first layer when diffusers' sinusoid (two halves, sin and
    cos, frequencies ``exp(-ln(10000) k / (half - shift))``) shrinks from ``original`` to ``kept``
    channels and the smaller grid of frequencies is a subset of the original one; else None."""
    half, new_half = original // 2, kept // 2
    if new_half - shift <= 0 or original % 2 or kept % 2:
        return None
    stride = (half - shift) / (new_half - shift)
    if abs(stride - round(stride)) > 1e-9 or (new_half - 1) * round(stride) > half - 1:
        return None
    columns = [j * round(stride) for j in range(new_half)]
    return columns + [half + k for k in columns]


def shrink_time_inputs(model, config: dict, kept: int, steps: int, record: dict) -> dict:
    """Give the layers fed by the time sinusoid (``TIME_INPUTS``) inputs for a sinusoid of ``kept``
    channels. Where the frequencies nest, their columns are kept (exact; recorded in ``record``). Else
    the weights are refit by least squares so that the layer's output over the timesteps 0..steps-1
    stays as close as possible to the original's; returns what was done and the relative error."""
    from diffusers.models.embeddings import get_timestep_embedding

    original = int(config["block_out_channels"][0])
    flip, shift = bool(config.get("flip_sin_to_cos", False)), float(config.get("freq_shift", 0))
    columns = time_columns(original, kept, shift)
    t = torch.arange(steps, dtype=torch.float64)
    before = get_timestep_embedding(t, original, flip, shift).double()
    after = get_timestep_embedding(t, kept, flip, shift).double()
    modules = dict(model.named_modules())
    worst = 0.0
    for name in TIME_INPUTS:
        layer = modules.get(name)
        if not isinstance(layer, torch.nn.Linear) or layer.in_features != original:
            continue
        weight = layer.weight.data
        if columns is not None:
            new = weight.index_select(1, torch.tensor(columns, device=weight.device))
            record.setdefault(name, {})["in"] = columns
        else:
            wanted = before @ weight.double().cpu().T
            fitted = torch.linalg.lstsq(after, wanted).solution
            worst = max(worst, float((after @ fitted - wanted).norm() / wanted.norm()))
            new = fitted.T.to(weight.dtype, copy=True).to(weight.device)
        layer.weight = torch.nn.Parameter(new.contiguous(), requires_grad=layer.weight.requires_grad)
        layer.in_features = kept
    if columns is not None:
        return {"exact": True, "method": "kept the nesting frequencies' columns"}
    return {
        "exact": False,
        "method": f"least-squares refit over timesteps 0..{steps - 1}",
        "relative_error": worst,
    }


def prune_to_layout(
    loaded: LoadedModel,
    adapter,
    scores,
    measure,
    base: tuple[int, int],
    options,
    ratio: float | None = None,
    target_macs: float | None = None,
    target_params: float | None = None,
    tolerance: float = 0.05,
    on_trial=None,
) -> tuple[float, list[dict], dict, dict]:
    """Prune ``loaded`` IN PLACE into the diffusers layout: ``prune_to_target``'s result (ratio, trials,
    kept channels) plus the layout's details; ``loaded.model`` becomes ``Class.from_config(config)`` holding the pruned weights."""
    from dpcli.io.model_format import layer_widths, module_shapes
    from dpcli.pruning import prune_in_place

    check_supported(loaded, options)
    model = loaded.model
    original_config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    plan, measured = choose_plan(
        loaded, measure, base, options.round_to, ratio, target_macs, target_params, tolerance, on_trial
    )
    widths_before = {name: layer_widths(module) for name, module in model.named_modules()}
    target = module_shapes(build(model, plan.config, "meta"))
    kept = prune_in_place(loaded, adapter, scores, 0.0, options, select=group_selector(target))
    pruned = loaded.model
    details = {"level_widths": plan.widths, "channel_mult_ratios": plan.ratios}
    original_first = int(original_config["block_out_channels"][0])
    if plan.widths[0] != original_first:
        steps = int(getattr(getattr(loaded.scheduler, "config", None), "num_train_timesteps", 1000) or 1000)
        details["time_frequencies"] = shrink_time_inputs(pruned, original_config, plan.widths[0], steps, kept)
    result = build(model, plan.config, "meta")
    state = pruned.state_dict()
    expected = result.state_dict()
    wrong = [k for k in expected if k not in state or tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong or len(state) != len(expected):
        raise DpError(f"the pruned weights do not match the diffusers layout (e.g. {wrong[:1]})")
    result.load_state_dict(state, strict=True, assign=True)
    loaded.model = result.eval()
    loaded.config = dict(plan.config)
    if loaded.record and "base" in loaded.record:
        loaded.record = {**loaded.record, "base": {**loaded.record["base"], "config": dict(plan.config)}}
    for name in kept:
        if name not in widths_before:
            raise DpError(f"kept channels recorded for unknown module {name}")
    details["original_config"] = original_config
    trials = [
        {"ratio": round(1 - p.keep, 4), "params": p.params, "macs": p.macs, "widths": p.widths}
        for p in measured
    ]
    return round(1 - plan.keep, 4), trials, kept, details


def pipeline_index(loaded: LoadedModel) -> dict | None:
    """The ``model_index.json`` that lets ``DiffusionPipeline.from_pretrained`` load a diffusers-layout
    folder: DDPMPipeline for pixel UNets, StableDiffusion(XL)Pipeline for text-conditional latent UNets;
    None where diffusers has no pipeline whose component names match the folder's."""
    components = loaded.components or {}
    index: dict = {}
    if loaded.adapter_name == "ddpm":
        index["_class_name"] = "DDPMPipeline"
    elif loaded.adapter_name == "ldm" and loaded.extras.get("conditioning") == "text":
        xl = "text_encoder_2" in components
        index["_class_name"] = "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"
        if not xl:
            index.update({"safety_checker": [None, None], "feature_extractor": [None, None]})
            index["requires_safety_checker"] = False
    else:
        return None
    for name, component in components.items():
        index[name] = [type(component).__module__.split(".")[0], type(component).__name__]
    index["unet"] = ["diffusers", type(loaded.model).__name__]
    if loaded.scheduler is not None:
        index["scheduler"] = ["diffusers", type(loaded.scheduler).__name__]
    return index
