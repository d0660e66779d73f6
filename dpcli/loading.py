"""Resolving what the user pointed at, choosing an adapter and loading the model: ``load_model``.

Weights are read through ``dpcli.io.weights`` (no arbitrary object is ever unpickled).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dpcli.adapters.base import LoadedModel, ModelAdapter, ModelSource
from dpcli.errors import BadInput, BadSetting, DpError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
        raise BadSetting(
            "adapter",
            "no adapter recognises {spec} (installed adapters: {known}; force one with {adapter})",
            spec=source.spec,
            known=known,
        )
    return scored[0][2]


_RENAMED = (
    "LoadedModel.adapter (the name) is now adapter_name, adapter_object is now adapter (set by dp), "
    "pruning is now record"
)


def load_model(
    spec: str,
    adapter: str | None = None,
    config: Path | None = None,
    scheduler: Path | None = None,
    weights_dtype: str | None = None,
) -> LoadedModel:
    """Load a model for dp from anything the CLI's MODEL argument accepts. The Python API entry point.

    ``scheduler`` (a scheduler_config.json or a folder holding one) replaces the model's own scheduler.
    ``weights_dtype`` (fp32, bf16 or fp16) is the dtype the denoiser and its modules are built and loaded
    in; the built-in adapters never make a float32 copy on the way (``dpcli.weights_dtype``).
    """
    from dpcli.weights_dtype import building_in, cast_loaded, resolve_weights_dtype

    dtype = resolve_weights_dtype(weights_dtype)
    for label, path in (("config", config), ("scheduler", scheduler)):
        if path is not None and not Path(path).exists():
            raise BadInput(f"{label} not found: {path}")
    source = resolve_source(spec)
    chosen = choose_adapter(source, adapter)
    try:
        with building_in(dtype):
            loaded = chosen.load(source, config=Path(config) if config is not None else None)
    except TypeError as exc:
        if "LoadedModel.__init__()" not in str(exc):
            raise
        raise DpError(f"adapter {chosen.name!r} was written for an older dpcli ({exc}): {_RENAMED}") from None
    if "pruning" in vars(loaded) or not isinstance(loaded.adapter_name, str):
        raise DpError(f"adapter {chosen.name!r} was written for an older dpcli: {_RENAMED}")
    loaded.adapter = chosen
    if weights_dtype is not None:
        cast_loaded(loaded, dtype)  # for adapters that build in float32 whatever they are asked
    if scheduler is not None:
        from dpcli.io.diffusers_files import load_scheduler

        loaded.scheduler = load_scheduler(Path(scheduler))
        loaded.scheduler_origin = f"{type(loaded.scheduler).__name__} from --scheduler {scheduler}"
    return loaded
