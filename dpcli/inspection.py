"""What is in a model: parameters, MACs and channels per layer (the data behind ``dp inspect``)."""

from __future__ import annotations

from collections import OrderedDict

import torch

from dpcli.adapters.base import LoadedModel
from dpcli.flops import count_macs, count_params
from dpcli.io.model_format import layer_widths


def macs_of(loaded: LoadedModel):
    """The MacsReport of one batch-1 forward at the native sample size, through the model's adapter."""
    adapter = loaded.adapter
    inputs = adapter.example_inputs(loaded, batch_size=1)
    return count_macs(loaded.model, inputs, call=lambda model, *args: adapter.predict(loaded, *args))


def layer_rows(loaded: LoadedModel, macs=None) -> list[dict]:
    """One row per layer that has parameters or MACs: name, type, own params and MACs, widths."""
    self_macs = (macs or macs_of(loaded)).self_by_module
    rows = []
    for name, module in loaded.model.named_modules():
        own_params = sum(p.numel() for p in module.parameters(recurse=False))
        own_macs = self_macs.get(name, 0)
        if not name or (own_params == 0 and own_macs == 0):
            continue
        rows.append(
            {"name": name, "type": type(module).__name__, "params": own_params, "macs": own_macs}
            | layer_widths(module)
        )
    return rows


def inspect_model(loaded: LoadedModel, depth: int | None = None) -> dict:
    """A JSON-ready report: summary, totals and one row per layer (or per block at ``depth``)."""
    model = loaded.model
    macs = macs_of(loaded)
    original = (loaded.record or {}).get("original_modules", {})
    layers = layer_rows(loaded, macs)
    for row in layers:
        name = row["name"]
        if name in original:
            before = original[name]
            row["original_in_channels"] = before.get("in_channels")
            row["original_out_channels"] = before.get("out_channels")
            if before.get("heads") is not None:
                row["original_heads"] = before["heads"]
            if before.get("out_channels") and row.get("out_channels") is not None:
                row["sparsity"] = 1 - row["out_channels"] / before["out_channels"]
    attention_macs = sum(r["macs"] for r in layers if "heads" in r)
    params = count_params(model)
    report = {
        "adapter": loaded.adapter_name,
        "class": type(model).__name__,
        "source": loaded.source,
        "source_kind": loaded.source_kind,
        "params": params,
        "macs": macs.total,
        "macs_attention": attention_macs,
        "input_shape": [1, loaded.in_channels, loaded.sample_size, loaded.sample_size],
        "input_shape_text": f"input 1x{loaded.in_channels}x{loaded.sample_size}x{loaded.sample_size}",
        "sample_size": loaded.sample_size,
        "in_channels": loaded.in_channels,
        "scheduler": _scheduler_text(loaded),
        "components": [
            {"name": name, "class": type(component).__name__, "params": count_params(component)}
            for name, component in loaded.components.items()
            if isinstance(component, torch.nn.Module)
        ],
        "notes": list(loaded.notes),
        "pruned": _pruned_summary(loaded),
        "depth": depth,
        "layers": group_layers(layers, depth) if depth else layers,
    }
    return report


def _scheduler_text(loaded: LoadedModel) -> str | None:
    if loaded.scheduler is None:
        return None
    steps = getattr(loaded.scheduler.config, "num_train_timesteps", None)
    return f"{loaded.scheduler_origin}, {steps} training steps"


def _pruned_summary(loaded: LoadedModel) -> dict | None:
    if not loaded.record:
        return None
    pruning = loaded.record.get("pruning")
    if not pruning:
        return None
    sizes = loaded.record.get("sizes", {})
    return {
        "criterion": pruning.get("criterion"),
        "cutoff": pruning.get("cutoff"),
        "base": loaded.record.get("base", {}).get("source"),
        **sizes,
    }


def group_layers(layers: list[dict], depth: int) -> list[dict]:
    """Sum layer rows into blocks named by the first ``depth`` parts of their module path."""
    groups: OrderedDict[str, dict] = OrderedDict()
    for layer in layers:
        key = ".".join(layer["name"].split(".")[:depth])
        group = groups.setdefault(key, {"name": key, "type": "block", "params": 0, "macs": 0, "layers": 0})
        group["params"] += layer["params"]
        group["macs"] += layer["macs"]
        group["layers"] += 1
        if layer.get("out_channels") is not None:
            group["out_channels"] = layer["out_channels"]
            if layer.get("original_out_channels") is not None:
                group["original_out_channels"] = layer["original_out_channels"]
    return list(groups.values())
