"""The dtype a model's weights are built and loaded in (``--weights-dtype``, ``weights_dtype=``).

Loading in bf16 must never make a float32 copy first: an SDXL UNet is 10.3 GB in float32 and 5.1 GB in
bf16. ``load_model`` sets the dtype for the duration of an adapter's ``load`` (``building_in``); the
builders read it (``target_dtype``): random models are constructed with it as torch's default dtype (so
every parameter is allocated and initialised in it), checkpoint tensors are converted from their stored
dtype straight to it, one tensor at a time. An adapter that ignores it gets its model cast after loading.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from dpcli.errors import BadSetting

WEIGHTS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

_current: ContextVar[torch.dtype] = ContextVar("dpcli_weights_dtype", default=torch.float32)


def resolve_weights_dtype(name: str | None) -> torch.dtype:
    """``fp32`` (the default, also for None), ``bf16`` or ``fp16`` as a torch dtype; else a BadSetting."""
    if name is None:
        return torch.float32
    if name not in WEIGHTS_DTYPES:
        raise BadSetting(
            "weights_dtype", "{weights_dtype} must be one of " + ", ".join(WEIGHTS_DTYPES), got=repr(name)
        )
    return WEIGHTS_DTYPES[name]


def target_dtype() -> torch.dtype:
    """The dtype the model being loaded is built in (float32 outside ``building_in``)."""
    return _current.get()


@contextmanager
def building_in(dtype: torch.dtype) -> Iterator[None]:
    """Build and load models in ``dtype`` inside this block."""
    token = _current.set(dtype)
    try:
        yield
    finally:
        _current.reset(token)


@contextmanager
def default_dtype(dtype: torch.dtype | None = None) -> Iterator[None]:
    """torch's default floating dtype set to ``dtype`` (default: ``target_dtype()``) inside this block, so
    that modules constructed there allocate and initialise their parameters in it directly."""
    dtype = dtype or target_dtype()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def to_target(tensor: torch.Tensor) -> torch.Tensor:
    """A floating checkpoint tensor in the target dtype (itself when it already is); others unchanged."""
    dtype = target_dtype()
    return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor


def cast_loaded(loaded, dtype: torch.dtype) -> None:
    """Cast the denoiser and its modules to ``dtype`` where an adapter built them in another dtype."""
    modules = [loaded.model, *(c for c in loaded.components.values() if isinstance(c, torch.nn.Module))]
    for module in modules:
        if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
            module.to(dtype)
