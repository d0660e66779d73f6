"""Watching a fine-tuning run while it goes: ``OUT/metrics.jsonl``, a tracker (TensorBoard or W&B) and
periodic validation samples with small-sample metrics.

- ``OUT/metrics.jsonl``: one JSON record per optimizer step, appended and flushed as the run goes (``tail -f``
  works), written by rank 0 only. On ``--resume`` the records after the resumed checkpoint's step are dropped
  first (a killed run may have written them, or half of one), so the file holds every step exactly once.
- ``--report-to tensorboard`` writes event files under ``OUT/tensorboard/`` (``tensorboard --logdir OUT``);
  a resumed run purges the events after its checkpoint's step. ``wandb`` logs the same through W&B, offline
  unless ``WANDB_MODE`` or ``WANDB_API_KEY`` says otherwise (``wandb sync OUT/wandb`` uploads it later).
- ``--validate-every N``: every N steps and at the last one, sample ``--validation-samples K`` images with the
  EMA weights from fixed noise (the run's seed, the same for every validation, so grids compare step to step),
  write the grid to ``OUT/validation/step-<N>.png`` and the tracker, and when the data allows it a FID against
  the training images (``builtin:digits``: the shipped digits features; otherwise Inception-v3 weights found
  locally) and for text models a CLIP score, under the protocol ``dp eval`` records
  (``OUT/validation/protocol.json``).

Validation never changes the training trajectory: it runs under ``torch.inference_mode`` on the EMA module
(its own copy of the weights, never trained), with its own seeded generators, inside ``torch.random.fork_rng``
so the global RNG states checkpoints record are untouched, and the EMA module's mode and memory format are
restored afterwards. Under torchrun every rank samples its share of the batches (``dpcli.sampling.generate``)
and rank 0 gathers, scores and writes while the others wait.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from dpcli.adapters.base import LoadedModel
from dpcli.errors import BadSetting
from dpcli.io.files import WriteFailed, atomic_write, write_failure
from dpcli.jobs.finetune.settings import FinetuneSettings, default_report_to

METRICS_FILE = "metrics.jsonl"
VALIDATION_DIR = "validation"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
PROTOCOL_FILE = "protocol.json"
# What a run writes into OUT while it goes; ``save_finetuned`` carries these into the final folder.
RUN_FILES = (METRICS_FILE, VALIDATION_DIR, TENSORBOARD_DIR, WANDB_DIR)
VALIDATION_SAMPLER_STEPS = 50  # DDIM steps of a validation sample (as --preview)
# Reference images of a validation FID: the training data, evenly spaced, at most this many (feature
# statistics of millions of images would cost more than the run's validations together).
VALIDATION_REFERENCE_LIMIT = 10_000


def validation_grid_path(output: Path, step: int) -> Path:
    return Path(output) / VALIDATION_DIR / f"step-{step}.png"


# metrics.jsonl ----------------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict]:
    """The complete records of a metrics file (a line cut short by a killed writer is skipped)."""
    records = []
    if not Path(path).is_file():
        return records
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


class MetricsLog:
    """``OUT/metrics.jsonl``: a fresh run starts it empty; a resumed one keeps the records up to
    ``start_step`` (rewritten atomically) and appends."""

    def __init__(self, path: Path, start_step: int):
        self.path = Path(path)
        kept = [r for r in read_metrics(self.path) if r["step"] <= start_step] if start_step else []
        with atomic_write(self.path) as temporary:
            temporary.write_text("".join(json.dumps(record) + "\n" for record in kept))
        self.file = open(self.path, "a")  # noqa: SIM115 (open for the whole run, closed by close())

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, allow_nan=True) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def gradient_norm(model: torch.nn.Module, clip: float) -> torch.Tensor:
    """The total gradient norm before clipping; the gradients are clipped to ``clip`` when it is > 0."""
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


# Trackers -----------------------------------------------------------------------------------------


def _wait_for_a_later_second(log_dir: Path) -> None:
    """Wait until the clock's second is past every event file's in ``log_dir``.

    TensorBoard reads the files of a run in name order (``events.out.tfevents.<second>.<host>.<pid>...``) and
    applies a purge only to the events before it: a resumed run's file named in the same second as the killed
    run's, with a smaller pid, would be read first and the killed run's later steps would survive."""
    seconds = [
        int(parts[3])
        for parts in (path.name.split(".") for path in log_dir.glob("events.out.tfevents.*"))
        if len(parts) > 3 and parts[3].isdigit()
    ]
    while seconds and time.time() < max(seconds) + 1:
        time.sleep(0.05)


class TensorBoardTracker:
    """Event files under ``OUT/tensorboard``: scalars ``train/<metric>`` and ``validation/<metric>``, the
    validation grid as the image ``validation/samples``, the settings as text."""

    def __init__(self, output: Path, start_step: int, settings: dict):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = Path(output) / TENSORBOARD_DIR
        if start_step:
            _wait_for_a_later_second(log_dir)
        # purge_step: TensorBoard drops the events a killed run wrote after the resumed checkpoint.
        self.writer = SummaryWriter(
            log_dir=str(log_dir),
            purge_step=start_step + 1 if start_step else None,
            flush_secs=10,
        )
        if not start_step:
            self.writer.add_text("settings", _settings_markdown(settings), 0)

    def log(self, step: int, scalars: dict) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def image(self, step: int, name: str, pixels) -> None:
        self.writer.add_image(name, pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in ``OUT/wandb``, offline unless ``WANDB_MODE`` (or an API key in ``WANDB_API_KEY``) says
    otherwise; a resumed dp run continues the same W&B run (its id is kept in ``OUT/wandb/dpcli-run-id``;
    steps W&B already holds are dropped by W&B, and they are the same numbers: the run is deterministic)."""

    def __init__(self, output: Path, start_step: int, settings: dict):
        import wandb

        folder = Path(output) / WANDB_DIR
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "dpcli-run-id"
        run_id = id_file.read_text().strip() if start_step and id_file.is_file() else wandb.util.generate_id()
        id_file.write_text(run_id)
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "dpcli"),
            name=Path(output).name,
            id=run_id,
            resume="allow",
            dir=str(output),
            mode=mode,
            config=settings,
        )

    def log(self, step: int, scalars: dict) -> None:
        self.run.log(scalars, step=step)

    def image(self, step: int, name: str, pixels) -> None:
        self.run.log({name: self.wandb.Image(pixels, caption=f"step {step}")}, step=step)

    def close(self) -> None:
        self.run.finish()


def _settings_markdown(settings: dict) -> str:
    rows = "\n".join(f"| {key} | `{value}` |" for key, value in settings.items())
    return f"| setting | value |\n|---|---|\n{rows}"


def open_tracker(report_to: str, output: Path, start_step: int, settings: dict):
    if report_to == "tensorboard":
        return TensorBoardTracker(output, start_step, settings)
    if report_to == "wandb":
        return WandbTracker(output, start_step, settings)
    return None


# Validation -------------------------------------------------------------------------------------


def check_validation(loaded: LoadedModel, settings: FinetuneSettings) -> None:
    """Refuse validation prompts a model cannot take, or a text model validated without them (before
    anything is trained or written)."""
    if not settings.validate_every:
        return
    kind = loaded.adapter.conditioning_spec(loaded).kind
    if settings.validation_prompt and kind != "text":
        raise BadSetting(
            "validation_prompt",
            "{validation_prompt} applies to text-conditional models; {model} is not one",
            model=loaded.source,
        )
    if kind == "text" and not settings.validation_prompt:
        raise BadSetting(
            "validation_prompt",
            "{validate_every} on the text-conditional {model} needs at least one {validation_prompt}",
            model=loaded.source,
        )


@dataclasses.dataclass
class _Scores:
    """How validation samples are scored, decided once (FID reference statistics computed once)."""

    fid_plan: object | None
    fid_reason: str | None
    reference_stats: object | None
    clip_folder: Path | None
    clip_reason: str | None
    protocol: dict


class Validator:
    """Samples ``settings.validation_samples`` images of the EMA model and scores them."""

    def __init__(self, loaded: LoadedModel, settings: FinetuneSettings, output: Path):
        from dpcli.conditions import ConditioningRequest
        from dpcli.jobs.measure import resolve_sampling_conditions, with_conditions
        from dpcli.sampling import SamplerSettings

        self.loaded, self.settings, self.output = loaded, settings, Path(output)
        request = ConditioningRequest(prompts=list(settings.validation_prompt))
        self.conditions = resolve_sampling_conditions(loaded, request)
        sampling = SamplerSettings(
            sampler="ddim",
            steps=VALIDATION_SAMPLER_STEPS,
            seed=settings.seed,
            batch_size=settings.batch_size,
            precision=settings.precision,
        )
        self.sampling = with_conditions(sampling, self.conditions)
        self.scores: _Scores | None = None

    def _plan_scores(self, view: LoadedModel, image_shape: list[int], device) -> _Scores:
        from dpcli.jobs.measure import plan_clip
        from dpcli.jobs.protocol import build_protocol

        fid_plan, fid_reason, stats = self._plan_fid(view, device)
        clip_folder, clip_reason = plan_clip(self.conditions, None, self.loaded.source)
        count = self.settings.validation_samples
        protocol = build_protocol(self.sampling, count, self.conditions, image_shape, fid_plan, clip_folder)
        protocol["reference_count"] = stats.count if stats is not None else None
        return _Scores(fid_plan, fid_reason, stats, clip_folder, clip_reason, protocol)

    def _plan_fid(self, view: LoadedModel, device):
        """The FID plan against the training data and its reference statistics, or why there is none."""
        from dpcli.data import ImageTransform, example_batches, open_source
        from dpcli.jobs.measure import plan_fid
        from dpcli.metrics import FidComputer, data_as_uint8, default_inception_path, find_inception_weights

        data = self.settings.data
        if self.settings.validation_samples < 2:
            return None, "FID needs at least 2 validation samples", None
        if str(data) != "builtin:digits" and find_inception_weights(None) is None:
            return None, f"no Inception-v3 weights at {default_inception_path()} (dp never downloads)", None
        plan = plan_fid(data, None, None, None, self.settings.validation_samples)
        source = plan.source if plan.source is not None else open_source(data)
        count = len(source)
        indices = [int(i * count / VALIDATION_REFERENCE_LIMIT) for i in range(VALIDATION_REFERENCE_LIMIT)]
        indices = indices if count > VALIDATION_REFERENCE_LIMIT else None
        adapter = view.adapter
        transform = ImageTransform(adapter.data_size(view), adapter.data_channels(view))
        fid = FidComputer(plan.extractor, plan.inception_weights, device=device)
        for batch in example_batches(source, transform, indices=indices, workers=self.settings.workers):
            fid.update(data_as_uint8(batch.pixels), real=True)
        return plan, None, fid.real_stats(str(data))

    def run(self, ema_module: torch.nn.Module, step: int) -> tuple[dict, object] | None:
        """Sample and score at ``step``; on rank 0 the record and the grid pixels (HWC uint8), else None."""
        from dpcli.sampling import Sampler, generate

        started, cpu_started = time.perf_counter(), time.process_time()
        view = dataclasses.replace(self.loaded, model=ema_module)
        device = next(ema_module.parameters()).device
        with _restored(ema_module, device):
            sampler = Sampler(view, dataclasses.replace(self.sampling), device=device)
            samples = generate(sampler, self.settings.validation_samples)
            if samples is None:  # another rank's share was gathered by rank 0
                return None
            if self.scores is None:
                self.scores = self._plan_scores(view, list(samples.images.shape[1:]), device)
                self._write_protocol()
            fid = self._fid(samples, device)
            clip = self._clip(samples, device)
        grid, pixels = self._write_grid(samples.images, step)
        record = {
            "samples": len(samples.images),
            "grid": str(grid.relative_to(self.output)),
            "fid": fid,
            "clip_score": clip,
            "seconds": time.perf_counter() - started,
            "cpu_seconds": time.process_time() - cpu_started,
        }
        return record, pixels

    def _fid(self, samples, device) -> float | None:
        from dpcli.metrics import FidComputer

        scores = self.scores
        if scores.fid_plan is None:
            return None
        fid = FidComputer(scores.fid_plan.extractor, scores.fid_plan.inception_weights, device=device)
        fid.set_real_stats(scores.reference_stats)
        fid.update(samples.images, real=False)
        return fid.compute()

    def _clip(self, samples, device) -> float | None:
        from dpcli.jobs.measure import compute_clip_score

        if self.scores.clip_folder is None:
            return None
        value, _ = compute_clip_score(self.scores.clip_folder, samples, self.conditions, device=device)
        return value

    def _write_grid(self, images: torch.Tensor, step: int):
        import numpy as np
        from PIL import Image

        from dpcli.jobs.evaluate import conditional_grid
        from dpcli.plots import save_image_grid

        rows, captions = conditional_grid(images, self.conditions)
        path = validation_grid_path(self.output, step)
        with atomic_write(path, suffix=".png") as temporary:
            save_image_grid(rows, temporary, captions=captions)
        with Image.open(path) as picture:
            return path, np.asarray(picture.convert("RGB"))

    def _write_protocol(self) -> None:
        scores = self.scores
        protocol = {
            **scores.protocol,
            "fid_unavailable": scores.fid_reason,
            "clip_unavailable": scores.clip_reason,
        }
        with atomic_write(self.output / VALIDATION_DIR / PROTOCOL_FILE) as temporary:
            temporary.write_text(json.dumps(protocol, indent=2))


@contextlib.contextmanager
def _restored(module: torch.nn.Module, device: torch.device):
    """Leave no trace of sampling: the global RNG states, the module's train/eval mode and (on GPU, where the
    sampler switches to channels_last) its parameters' memory format are as they were."""
    modes = {name: sub.training for name, sub in module.named_modules()}
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for name, sub in module.named_modules():
            sub.train(modes[name])
        if device.type == "cuda":
            module.to(memory_format=torch.contiguous_format)


# The monitor the training loop talks to -------------------------------------------------------------


class RunMonitor:
    """What ``dpcli.jobs.finetune.loop.finetune`` reports every step to: writes metrics.jsonl and the
    tracker on rank 0 and runs the validations (every rank takes part in sampling)."""

    def __init__(
        self,
        loaded: LoadedModel,
        settings: FinetuneSettings,
        output: Path,
        record: dict,
        start_step: int,
        dist,
    ):
        self.settings, self.output, self.dist = settings, Path(output), dist
        self.record, self.start_step = record, start_step
        self.validator = Validator(loaded, settings, output) if settings.validate_every else None
        self.metrics: MetricsLog | None = None
        self.tracker = None

    def _open(self) -> None:
        """Rank 0's files, opened once the first step is done (a run refused before then writes nothing)."""
        _clear_run_files(self.output, self.start_step)
        self.output.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(self.output / METRICS_FILE, self.start_step)
        if self.validator is not None:
            (self.output / VALIDATION_DIR).mkdir(exist_ok=True)
        report_to = self.settings.report_to or default_report_to()
        self.tracker = open_tracker(report_to, self.output, self.start_step, _flat(self.record["settings"]))

    def validation_due(self, step: int) -> bool:
        every = self.settings.validate_every
        return bool(every) and (step % every == 0 or step == self.settings.steps)

    def after_step(self, step: int, metrics: dict, ema_module: torch.nn.Module, stopping: bool) -> None:
        """Record optimizer step ``step`` (``metrics``: loss, lr, ...), validating first when due (not when
        the run is stopping on a signal: the checkpoint comes first)."""
        with writing(self.output):
            self._after_step(step, metrics, ema_module, stopping)

    def _after_step(self, step: int, metrics: dict, ema_module: torch.nn.Module, stopping: bool) -> None:
        if self.dist.is_main and self.metrics is None:
            self._open()
        validation = None
        if self.validator is not None and self.validation_due(step) and not stopping:
            result = self.validator.run(ema_module, step)
            if result is not None:
                validation, pixels = result
                if self.tracker is not None:
                    self.tracker.image(step, "validation/samples", pixels)
            self.dist.barrier()
        if not self.dist.is_main:
            return
        record = {"step": step, **metrics}
        if validation is not None:
            record["validation"] = validation
        self.metrics.write(_json_safe(record))
        if self.tracker is not None:
            scalars = {f"train/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
            if validation is not None:
                scalars.update(
                    {
                        f"validation/{k}": validation[k]
                        for k in ("fid", "clip_score")
                        if validation[k] is not None
                    }
                )
            self.tracker.log(step, scalars)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.tracker is not None:
            self.tracker.close()


def _flat(settings: dict) -> dict:
    return {
        k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in settings.items()
    }


def _json_safe(record: dict) -> dict:
    def safe(value):
        if isinstance(value, dict):
            return {k: safe(v) for k, v in value.items()}
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return value

    return safe(record)


def _clear_run_files(output: Path, start_step: int) -> None:
    """A fresh run removes an earlier run's files; a resumed one the validation grids after its step."""
    if not start_step:
        for name in RUN_FILES:
            path = output / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        return
    folder = output / VALIDATION_DIR
    if folder.is_dir():
        for grid in folder.glob("step-*.png"):
            number = grid.stem[5:]
            if number.isdigit() and int(number) > start_step:
                grid.unlink()


@contextlib.contextmanager
def writing(output: Path):
    """A failed write of the run's files (a full disk) is one line, and the run can go on with --resume."""
    try:
        yield
    except WriteFailed as exc:
        raise WriteFailed(f"{exc} with --resume") from exc
    except OSError as exc:
        raise WriteFailed(f"{write_failure(exc, output)} with --resume") from exc


@contextlib.contextmanager
def run_monitor(
    loaded: LoadedModel, settings: FinetuneSettings, output: Path, record: dict, start_step: int, dist
):
    """The run's monitor, closed (files flushed, tracker finished) however the run ends."""
    monitor = RunMonitor(loaded, settings, output, record, start_step, dist)
    try:
        yield monitor
    except BaseException:
        with contextlib.suppress(Exception):  # the error that stopped the run is the one to report
            monitor.close()
        raise
    with writing(output):
        monitor.close()


def carry_run_files(output: Path, folder: Path) -> list[str]:
    """Move what the run wrote into OUT (metrics, validation, tracker logs) into ``folder``, the model folder
    that replaces OUT; the names moved."""
    moved = []
    for name in RUN_FILES:
        path = Path(output) / name
        if path.exists():
            os.replace(path, Path(folder) / name)
            moved.append(name)
    return moved


def curves_text(moved: list[str]) -> str:
    """The model card's section on the training curves in the folder."""
    lines = ["- `loss.png`: the loss and learning rate of every step."]
    if METRICS_FILE in moved:
        lines.append(
            f"- [`{METRICS_FILE}`]({METRICS_FILE}): one JSON record per optimizer step (loss, lr, grad norm, "
            "images/s, and the validation scores where validated)."
        )
    if VALIDATION_DIR in moved:
        lines.append(
            f"- [`{VALIDATION_DIR}/`]({VALIDATION_DIR}/): the validation sample grids, `step-<N>.png`."
        )
    if TENSORBOARD_DIR in moved:
        lines.append(f"- TensorBoard: `tensorboard --logdir {TENSORBOARD_DIR}` in this folder.")
    if WANDB_DIR in moved:
        lines.append(f"- Weights & Biases: `wandb sync {WANDB_DIR}` uploads an offline run.")
    return "\n".join(lines)
