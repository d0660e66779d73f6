"""Checkpoints of a fine-tuning run, and what a resumed run must share with them.

Checkpoints are folders ``OUT/checkpoints/step-NNNNNNNN/`` written under a temporary name and renamed:
``model.safetensors`` (raw weights), ``ema.safetensors``, ``state.safetensors`` (optimizer tensors, RNG
states, loss and lr history) and ``state.json`` (step, data position, settings, optimizer hyper-parameters,
LR schedule and grad-scaler state, and the size and SHA-256 of each tensor file). ``state.json`` is written
last, so a checkpoint without it is incomplete; one whose files do not match their recorded hashes is
corrupt (a disk or file system that lost data, a truncated copy) and ``--resume`` falls back to the newest
checkpoint that is intact. Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from dpcli import __version__
from dpcli.errors import BadInput, BadSetting
from dpcli.io.files import AtomicFolder
from dpcli.jobs.finetune.settings import FinetuneSettings

CHECKPOINT_FORMAT = "dpcli-checkpoint"
CHECKPOINT_VERSION = 2  # 2: state.json records the SHA-256 of every file
CHECKPOINT_DIR = "checkpoints"


# Settings a resumed run must share with the checkpoint for the result to be the run it continues: the
# fields marked "resume", and the global batch they are run with.
_RESUME_KEYS = (*FinetuneSettings.marked("resume"), "global_batch")
_CHECKPOINT_NAME = "step-{:08d}"
_TENSOR_FILES = ("model.safetensors", "ema.safetensors", "state.safetensors")
_HASH_CHUNK = 1 << 24


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every tensor of the model: a checkpoint applies only to the model it started from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def checkpoint_root(output: Path) -> Path:
    return Path(output) / CHECKPOINT_DIR


def checkpoints_newest_first(output: Path) -> list[Path]:
    """The checkpoint folders under OUT/checkpoints that hold a state.json, highest step first
    (temporary folders of a write that did not finish are ignored)."""
    root = checkpoint_root(output)
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        name = folder.name
        if folder.is_dir() and name.startswith("step-") and name[5:].isdigit():
            if (folder / "state.json").is_file():
                found.append((int(name[5:]), folder))
    return [folder for _, folder in sorted(found, reverse=True)]


def latest_checkpoint(output: Path) -> Path | None:
    """The checkpoint with the highest step under OUT/checkpoints (not verified: see
    ``newest_valid_checkpoint``)."""
    found = checkpoints_newest_first(output)
    return found[0] if found else None


def remove_unfinished_checkpoints(output: Path) -> None:
    """Remove the temporary folders of checkpoint writes that never finished (a killed run's); only
    the one writer of OUT (it holds the output lock) calls this."""
    root = checkpoint_root(output)
    if root.is_dir():
        for folder in root.glob(".step-*.tmp"):
            shutil.rmtree(folder, ignore_errors=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checkpoint(folder: Path) -> dict:
    """The state of checkpoint ``folder`` once its files are checked against the sizes and SHA-256
    recorded in its state.json; a BadInput saying what is wrong otherwise. Checkpoints of format 1 (no
    hashes) are checked by reading their safetensors headers."""
    state = read_checkpoint_state(folder)
    recorded = state.get("files")
    if recorded is None:
        from safetensors import safe_open

        for name in _TENSOR_FILES:
            try:
                with safe_open(str(folder / name), framework="pt"):
                    pass
            except Exception as exc:  # safetensors raises its own error types for a damaged header
                raise BadInput(f"checkpoint {folder}: {name} is unreadable ({exc})") from None
        return state
    for name in _TENSOR_FILES:
        path = folder / name
        expected = recorded.get(name)
        if expected is None:
            raise BadInput(f"checkpoint {folder}: state.json records no hash for {name}")
        if not path.is_file():
            raise BadInput(f"checkpoint {folder}: {name} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise BadInput(f"checkpoint {folder}: {name} has {size} bytes, {expected['bytes']} were written")
        if file_sha256(path) != expected["sha256"]:
            raise BadInput(f"checkpoint {folder}: {name} does not match its SHA-256 (the file is corrupt)")
    return state


def newest_valid_checkpoint(output: Path) -> tuple[Path, dict, list[str]]:
    """The newest checkpoint under OUT/checkpoints whose files are intact, its state, and one line for
    each newer checkpoint that was skipped and why. BadSetting (exit 2) when none is intact."""
    skipped = []
    for folder in checkpoints_newest_first(output):
        try:
            return folder, verify_checkpoint(folder), skipped
        except BadInput as exc:
            skipped.append(str(exc))
    if not skipped:
        raise BadSetting("resume", "{resume}: no checkpoint in {folder}", folder=checkpoint_root(output))
    raise BadSetting(
        "resume",
        "{resume}: no intact checkpoint in {folder} ({why}); start over with {force}",
        folder=checkpoint_root(output),
        why="; ".join(skipped),
    )


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"optimizer.{index}.{key}"] = value
    return tensors, _jsonable(state["param_groups"])


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, param_groups: list) -> None:
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


@dataclass
class TrainState:
    """Progress that checkpoints carry besides tensors of the model."""

    step: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    lrs: list[float] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    bad_samples: dict = dataclasses.field(default_factory=dict)  # BadSampleLog.state()


def save_checkpoint(
    output: Path,
    train: TrainState,
    model: torch.nn.Module,
    ema,
    optimizer: torch.optim.Optimizer,
    lr_schedule,
    scaler,
    record: dict,
    keep: int,
) -> Path:
    """Write ``OUT/checkpoints/step-N`` atomically (temp folder + rename); keep the newest ``keep``."""
    from safetensors.torch import save_file

    root = checkpoint_root(output)
    root.mkdir(parents=True, exist_ok=True)
    final = root / _CHECKPOINT_NAME.format(train.step)

    def tensors_of(module: torch.nn.Module) -> dict:
        return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}

    with AtomicFolder(final, force=True) as temporary:
        save_file(tensors_of(model), str(temporary / "model.safetensors"))
        save_file(tensors_of(ema.module), str(temporary / "ema.safetensors"))
        tensors, param_groups = _optimizer_tensors(optimizer)
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        tensors["history.loss"] = torch.tensor(train.losses, dtype=torch.float64)
        tensors["history.lr"] = torch.tensor(train.lrs, dtype=torch.float64)
        save_file(tensors, str(temporary / "state.safetensors"))
        files = {
            name: {"bytes": (temporary / name).stat().st_size, "sha256": file_sha256(temporary / name)}
            for name in _TENSOR_FILES
        }
        state = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "dpcli_version": __version__,
            "step": train.step,
            "samples_seen": train.step * record["settings"]["global_batch"],
            "seconds": train.seconds,
            "optimizer_param_groups": param_groups,
            "lr_schedule": _jsonable(lr_schedule.state_dict()),
            "grad_scaler": _jsonable(scaler.state_dict()),
            "files": files,
            "bad_samples": train.bad_samples,
            **record,
        }
        (temporary / "state.json").write_text(json.dumps(state, indent=2))
    complete = sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()),
        key=lambda p: int(p.name[5:]),
    )
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint_state(folder: Path) -> dict:
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise BadInput(f"checkpoint {folder} is unreadable: {exc}") from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise BadInput(f"{folder} is not a dp finetune checkpoint")
    if int(state.get("format_version", 0)) > CHECKPOINT_VERSION:
        raise BadInput(f"checkpoint {folder} was written by a newer dpcli; upgrade dpcli")
    return state


def check_resumable(state: dict, folder: Path, record: dict) -> None:
    """Refuse a checkpoint of another model or of a run with other settings (exit 2)."""
    if state.get("model_signature") != record["model_signature"]:
        raise BadSetting(
            "resume",
            "checkpoint {folder} is of another model (other layer widths); fine-tune {model} "
            "or start over with {force}",
            folder=folder,
            model=state.get("model"),
        )
    if state.get("model_fingerprint") != record["model_fingerprint"]:
        raise BadSetting(
            "resume",
            "checkpoint {folder} started from other weights ({model}); resume with the "
            "same MODEL (and {reinit}/{seed}) or start over with {force}",
            folder=folder,
            model=state.get("model"),
        )
    saved, current = state.get("settings", {}), record["settings"]
    different = [key for key in _RESUME_KEYS if _comparable(saved.get(key)) != _comparable(current.get(key))]
    if different:
        key = different[0]
        raise BadSetting(
            key,
            "{resume}: the checkpoint was written with {" + key + "} {saved}, this run has {" + key + "} "
            "{current} (use the same settings, or start over with {force})",
            saved=repr(saved.get(key)),
            current=repr(current.get(key)),
        )


def _comparable(value):
    """A setting as resuming compares it: the bad-sample policy of ``data`` may change between runs (a run
    stopped by ``max_bad_fraction`` resumes with a higher one)."""
    if isinstance(value, dict) and "source" in value:
        return {k: v for k, v in value.items() if k not in ("on_bad_sample", "max_bad_fraction")}
    return value


def load_checkpoint(folder, state, model, ema, optimizer, lr_schedule, scaler, train, settings) -> None:
    from dpcli.io.diffusers_files import load_weights_into
    from dpcli.io.weights import load_tensor_file

    load_weights_into(model, load_tensor_file(folder / "model.safetensors"), str(folder))
    load_weights_into(ema.module, load_tensor_file(folder / "ema.safetensors"), str(folder))
    tensors = load_tensor_file(folder / "state.safetensors")
    _restore_optimizer(optimizer, tensors, state["optimizer_param_groups"])
    if state["settings"].get("steps") == settings.steps:
        lr_schedule.load_state_dict(state["lr_schedule"])
    lr_schedule.step_update(int(state["step"]))
    if state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    train.step = int(state["step"])
    train.losses = tensors["history.loss"].tolist()
    train.lrs = tensors["history.lr"].tolist()
    train.seconds = float(state.get("seconds", 0.0))
    train.bad_samples = state.get("bad_samples") or {}
