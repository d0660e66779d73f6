"""Reading weights files safely: a flat ``{name: tensor}`` dict, never an unpickled object.

``.safetensors`` is read with safetensors; ``.ckpt/.pt/.pth/.bin`` with ``torch.load(weights_only=True)``,
which refuses any pickle that would import code, and that refusal becomes a clear message.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch

from dpcli.errors import BadInput

TENSOR_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# Keys under which training frameworks nest the model's state dict, most specific first.
_NESTED_KEYS = ("state_dict", "model", "module", "model_state_dict", "ema")


def load_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` dict from a weights file without running code from it."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TENSOR_FILE_SUFFIXES:
        raise BadInput(
            f"{path}: unsupported file type '{suffix}' (expected {', '.join(TENSOR_FILE_SUFFIXES)})"
        )
    if path.stat().st_size == 0:
        raise BadInput(f"{path} is empty")
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise BadInput(f"{path} is not a valid safetensors file ({_first_line(exc)})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol chatter from the restricted unpickler
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc) or not _looks_like_pickle(path):
            raise BadInput(f"{path} is not a readable PyTorch checkpoint ({_first_line(exc)})") from None
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        needs = f" needs '{found.group(1)}' and" if found else " holds objects other than tensors and"
        raise BadInput(
            f"refusing to load {path}: the pickle{needs} could run arbitrary code when unpickled; "
            "only plain tensors are accepted (re-save the state dict, ideally as .safetensors)"
        ) from None
    except Exception as exc:
        raise BadInput(f"{path} is not a readable PyTorch checkpoint ({_first_line(exc)})") from None
    return _flat_tensor_dict(loaded, path)


def _flat_tensor_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, (list, tuple)):  # the DDIM codebase saves [model, optimizer, epoch, step, (ema)]
        obj = next((item for item in obj if _is_tensor_dict(item)), None)
    if isinstance(obj, dict) and not _is_tensor_dict(obj):
        for key in _NESTED_KEYS:
            if _is_tensor_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_tensor_dict(obj):
        raise BadInput(f"{path} holds no state dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def _is_tensor_dict(obj: object) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) for k in obj)
        and sum(isinstance(v, torch.Tensor) for v in obj.values()) >= max(1, len(obj) // 2)
    )


def _looks_like_pickle(path: Path) -> bool:
    """Torch's zip container, or a raw pickle (protocol 2+ starts with the PROTO opcode 0x80)."""
    import zipfile

    with open(path, "rb") as handle:
        head = handle.read(1)
    return head == b"\x80" or zipfile.is_zipfile(path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
