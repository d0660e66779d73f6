"""Resolving what the user pointed at, reading weights safely, and choosing an adapter.

Safety rule: no arbitrary object is ever unpickled. ``.safetensors`` is read with safetensors;
``.ckpt/.pt/.pth/.bin`` with ``torch.load(weights_only=True)``, which refuses any pickle that would
import code, and we turn that refusal into a clear message.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path

import torch

from dpcli.adapters.base import LoadedModel, ModelAdapter, ModelSource
from dpcli.errors import BadInput

TENSOR_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Keys under which training frameworks nest the model's state dict, most specific first.
_NESTED_KEYS = ("state_dict", "model", "module", "model_state_dict", "ema")


def resolve_source(spec: str) -> ModelSource:
    """Turn a user's MODEL argument into a ModelSource: path, built-in name, or Hub id (via the HF cache)."""
    if spec.startswith(("builtin:", "config:")):
        return ModelSource(spec=spec, kind="builtin")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not any(path.iterdir()):
            raise BadInput(f"model folder {spec} is empty")
        return ModelSource(spec=spec, kind="folder", path=path)
    if path.is_file():
        return ModelSource(spec=spec, kind="file", path=path)
    if path.exists():
        raise BadInput(f"{spec} is neither a file nor a folder")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/")) and not path.suffix:
        return ModelSource(spec=spec, kind="hub", path=download_hub_model(spec))
    raise BadInput(f"model not found: {spec} (expected a folder, a weights file, builtin:NAME or a Hub id)")


def download_hub_model(repo_id: str) -> Path:
    """The local snapshot of a Hub model: from the Hugging Face cache, downloading only when allowed.

    Respects HF_HUB_OFFLINE and HF_HOME/HF_HUB_CACHE like every Hugging Face tool.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    patterns = ["*.json", "*.safetensors", "*.txt", "*.yaml", "*.model"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except HFValidationError as exc:
        raise BadInput(f"invalid Hub id {repo_id!r}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # offline, not cached, private, network down: all the same to the user
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        why = "HF_HUB_OFFLINE is set" if offline else str(exc).splitlines()[0]
        raise BadInput(
            f"Hub model {repo_id} is not in the local Hugging Face cache and cannot be downloaded ({why})"
        ) from None


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


def choose_adapter(source: ModelSource, name: str | None = None) -> ModelAdapter:
    """The adapter for ``source``: the one named, else the one whose ``detect`` is most confident."""
    from dpcli.plugins import get_registry

    registry = get_registry()
    if name is not None:
        return registry.adapter(name)
    scored = []
    for adapter_name, adapter in registry.adapters.items():
        try:
            score = float(adapter.detect(source))
        except BadInput:
            raise
        except Exception:  # a plugin's faulty detect must not hide the other adapters
            score = 0.0
        scored.append((score, adapter_name, adapter))
    scored.sort(key=lambda item: (-item[0], item[1]))
    if not scored or scored[0][0] <= 0:
        known = ", ".join(sorted(registry.adapters)) or "none"
        raise BadInput(
            f"no adapter recognises {source.spec} (installed adapters: {known}; force one with --adapter)"
        )
    return scored[0][2]


def load_model(
    spec: str, adapter: str | None = None, config: Path | None = None, scheduler: Path | None = None
) -> LoadedModel:
    """Load a model for dp from anything the CLI's MODEL argument accepts. The Python API entry point.

    ``scheduler`` (a scheduler_config.json or a folder holding one) replaces the model's own scheduler.
    """
    for label, path in (("config", config), ("scheduler", scheduler)):
        if path is not None and not Path(path).exists():
            raise BadInput(f"{label} not found: {path}")
    source = resolve_source(spec)
    chosen = choose_adapter(source, adapter)
    loaded = chosen.load(source, config=Path(config) if config is not None else None)
    if scheduler is not None:
        from dpcli.adapters.unet2d import load_scheduler

        loaded.scheduler = load_scheduler(Path(scheduler))
        loaded.scheduler_origin = f"{type(loaded.scheduler).__name__} from --scheduler {scheduler}"
    return loaded
