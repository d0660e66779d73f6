"""Where the process runs: torchrun membership (one layer for training, sampling and evaluation),
the device and the autocast precision. Depends only on ``dpcli.errors``."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from dpcli.errors import BadSetting


@dataclass
class Distributed:
    """Where this process stands in a torchrun job (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    initialised_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.initialised_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def start_distributed(device: str = "auto") -> Distributed:
    """Join the torchrun job described by the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``), or run as a single process. NCCL on GPU, gloo on CPU.

    ``device``: ``auto`` (this rank's GPU when there is one, else the CPU), ``cpu``, ``cuda`` (GPU
    ``LOCAL_RANK``), ``cuda:N`` (one named GPU: a single process only) or ``mps`` (Apple GPU: a single
    process only)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = _parse_device(device, local_rank)
    if world_size > 1 and (device == "mps" or device.startswith("cuda:")):
        raise BadSetting(
            "device",
            "{device} {name} names one device for every process: under torchrun use {device} cuda "
            "(each process takes GPU LOCAL_RANK) or cpu",
            name=device,
        )
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    state = Distributed(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen)
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
        state.initialised_here = True
    return state


def _parse_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise BadSetting("device", "{device} mps: no Apple GPU (MPS) is available")
        return torch.device("mps")
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise BadSetting("device", "{device} {name}: no CUDA GPU is available", name=device)
        index = local_rank if device == "cuda" else int(device[5:])
        if index >= torch.cuda.device_count():
            raise BadSetting(
                "device",
                "{device} {name}: this machine has {count} CUDA GPU(s)",
                name=device,
                count=torch.cuda.device_count(),
            )
        return torch.device("cuda", index)
    raise BadSetting("device", "{device} must be auto, cpu, cuda, cuda:N or mps", got=repr(device))


PRECISIONS = ("fp32", "bf16", "fp16")


def check_precision(precision: str, device: torch.device | None = None) -> None:
    """``precision`` is fp32, bf16 or fp16 (autocast); fp16 needs a CUDA GPU (checked once ``device`` is
    known)."""
    if precision not in PRECISIONS:
        raise BadSetting(
            "precision", "{precision} must be one of " + ", ".join(PRECISIONS), got=repr(precision)
        )
    if precision == "fp16" and device is not None and device.type != "cuda":
        raise BadSetting("precision", "{precision} fp16 needs a CUDA GPU (use bf16 or fp32 on the CPU)")


def check_weights_precision(model: torch.nn.Module, precision: str) -> None:
    """A model loaded in bf16/fp16 (``--weights-dtype``) runs its scan under that same autocast
    ``precision``: float32 inputs do not meet half-precision weights."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    names = {torch.bfloat16: "bf16", torch.float16: "fp16"}
    if dtype in names and precision != names[dtype]:
        raise BadSetting(
            "precision",
            "{precision} {given} cannot scan weights loaded in {dtype}: use {precision} {dtype} "
            "(or {weights_dtype} fp32)",
            given=precision,
            dtype=names[dtype],
        )


def autocast(device: torch.device, precision: str):
    """Autocast to bf16/fp16 for ``precision``; nothing for fp32."""
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the joined process group, ``(0, 1)`` outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Rank 0, or a single process: the one that writes and prints."""
    return world()[0] == 0


def resolve_device(device: str | None = None) -> torch.device:
    """``device`` as given; else this rank's GPU under torchrun, any GPU, or the CPU."""
    if device:
        try:
            resolved = torch.device(device)
        except RuntimeError as exc:
            raise BadSetting("device", "{device}: {reason}", reason=exc) from None
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise BadSetting("device", "{device} {name}: CUDA is not available on this machine", name=device)
        return resolved
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32. ``auto``: bf16 (else fp16) on GPU, fp32 on CPU."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (timing needs it); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
