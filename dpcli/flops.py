"""Parameter and MAC counting with fvcore.

fvcore counts one fused multiply-add as one "flop", i.e. it reports MACs. It covers convolutions,
linear layers/matmuls, normalisations and upsampling; we add a handle for
``aten::scaled_dot_product_attention`` (which fvcore skips), counting Q·Kᵀ and A·V. Element-wise ops
(activations, additions, softmax) are not counted, as in the paper and torch-pruning's counter.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class MacsReport:
    """MACs of one forward: the total, and per module (including children) and per module (own ops only);
    ``self_by_operator`` splits each module's own MACs by operator (``conv``, ``linear``, ``group_norm``,
    ``scaled_dot_product_attention``, ...)."""

    total: int
    by_module: dict[str, int]
    self_by_module: dict[str, int]
    self_by_operator: dict[str, dict[str, int]] = field(default_factory=dict)


def _sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    from fvcore.nn.jit_handles import get_shape

    query, key, value = (get_shape(inputs[i]) for i in range(3))
    *batch, length, depth = query
    source_length = key[-2]
    value_depth = value[-1]
    batch_size = 1
    for size in batch:
        batch_size *= size
    return batch_size * length * source_length * (depth + value_depth)


class _Forward(torch.nn.Module):
    """Wraps a model so tracing sees a plain tensor output."""

    def __init__(self, model: torch.nn.Module, call):
        super().__init__()
        self.model = model
        self.call = call

    def forward(self, *inputs):
        return self.call(self.model, *inputs)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: torch.nn.Module, inputs: tuple, call=None) -> MacsReport:
    """MACs of ``call(model, *inputs)`` (default: ``model(*inputs)``, first output), per module.

    Module names are those of ``model.named_modules()`` ("" is the whole model).
    """
    call = call or _default_call
    wrapper = _Forward(model, call).eval()
    # fvcore logs a warning for every op it skips (silu, add, ...); we document what is counted instead.
    logging.getLogger("fvcore.nn.jit_analysis").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter, not the user's concern
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(wrapper, inputs)
        analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        raw = analysis.by_module()
        raw_operators = analysis.by_module_and_operator()
    by_module = {
        _strip(name): int(value)
        for name, value in raw.items()
        if name == "model" or name.startswith("model.")
    }
    by_module[""] = int(raw.get("model", analysis.total()))
    self_by_module = {}
    self_by_operator: dict[str, dict[str, int]] = {}
    for name, macs in by_module.items():
        children = [
            child
            for child in by_module
            if child != name
            and child.startswith(f"{name}." if name else "")
            and "." not in child[len(name) + 1 if name else 0 :]
        ]
        self_by_module[name] = macs - sum(by_module[c] for c in children)
        own = dict(raw_operators.get("model" if not name else f"model.{name}", {}))
        for child in children:
            for operator, count in raw_operators.get(f"model.{child}", {}).items():
                own[operator] = own.get(operator, 0) - count
        self_by_operator[name] = {operator: int(count) for operator, count in own.items() if count}
    return MacsReport(
        total=by_module[""],
        by_module=by_module,
        self_by_module=self_by_module,
        self_by_operator=self_by_operator,
    )


def _strip(name: str) -> str:
    return "" if name == "model" else name[len("model.") :]


def _default_call(model, *inputs):
    out = model(*inputs)
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "sample"):
        return out.sample
    return out
