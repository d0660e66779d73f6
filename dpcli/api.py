"""The Python API: the CLI's commands as functions, with the same names and settings.

::

    import dpcli

    model = dpcli.load("google/ddpm-cifar10-32")          # anything dp accepts as MODEL
    scores = dpcli.score(model, criterion="diff-taylor", data="images/", threshold=0.05)
    pruned = dpcli.prune(model, scores, target_macs=0.5)
    pruned.save("pruned/")                                 # the folder dp prune writes
    tuned = dpcli.finetune(dpcli.load("pruned/"), data="images/", steps=1000)
    report = dpcli.evaluate(tuned, data="images/", num_samples=256)

Each function builds the settings of the job the CLI command runs (``dpcli.jobs.*``) and calls it, so a
model pruned here and one pruned by ``dp prune`` with the same options are the same, and are recorded the
same. Failures are ``dpcli.errors`` exceptions (``BadInput``/``BadSetting`` for a mistake, naming the
keyword argument at fault). Nothing here imports torch until it is called.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpcli.errors import BadInput, BadSetting

if TYPE_CHECKING:
    import torch

    from dpcli.adapters.base import LoadedModel
    from dpcli.data.base import DataSpec
    from dpcli.jobs.evaluate import EvalReport
    from dpcli.jobs.export import ExportReport


class Model:
    """A model dp can work on: the denoiser (``module``), its scheduler and the components it needs
    (autoencoder, text encoder), and the record of how it was made (pruning, fine-tuning).

    Get one with :func:`load`; :func:`prune` and :func:`finetune` return one. ``save()`` writes the same
    folder the CLI writes, ``inspect()`` what ``dp inspect --json`` prints, ``pipeline()`` a diffusers
    pipeline, ``export()`` an ONNX file.
    """

    def __init__(self, loaded: LoadedModel, extra_weights: dict | None = None):
        self.loaded = loaded
        # The report of the prune or fine-tune that made this model (a PruneReport / FinetuneReport), if any.
        self.report = None
        # Saved beside the main weights by save() (a fine-tuned model's raw weights, as dp finetune does).
        self._extra_weights = extra_weights or {}

    def __repr__(self) -> str:
        steps = [entry.get("step") for entry in (self.record or {}).get("history", [])]
        made = f", history={steps}" if steps else ""
        return f"<dpcli.Model {self.source!r} adapter={self.adapter!r} {type(self.module).__name__}{made}>"

    @property
    def module(self) -> torch.nn.Module:
        """The denoiser (a diffusers ``UNet2DModel``/``UNet2DConditionModel`` for the built-in adapters)."""
        return self.loaded.model

    @property
    def scheduler(self):
        """The diffusers noise scheduler the model was trained with."""
        return self.loaded.scheduler

    @property
    def source(self) -> str:
        """What the model was loaded from."""
        return self.loaded.source

    @property
    def adapter(self) -> str:
        """The name of the adapter that handles it (``ddpm``, ``ldm``, or a plugin's)."""
        return self.loaded.adapter

    @property
    def record(self) -> dict | None:
        """How the model was made, as its folder's ``dpcli.json`` records it (``base``, ``pruning``,
        ``sizes``, ``history``, ``original_modules``); None for a model dp has not changed or saved."""
        return self.loaded.pruning

    def inspect(self, depth: int | None = None) -> dict:
        """What ``dp inspect --json`` prints: params, MACs, sample size, scheduler, per-layer rows
        (``depth`` groups them by the first N parts of the module path)."""
        from dpcli.inspection import inspect_model

        return inspect_model(self.loaded, depth=depth)

    def save(self, output: str | Path, force: bool = False) -> Path:
        """Write the model folder ``dp prune`` / ``dp finetune`` write (dpcli.json, unet/, scheduler/, the
        other components, README.md model card) to ``output``, atomically. An existing non-empty folder
        needs ``force``. Returns the folder."""
        from dpcli.io.files import AtomicFolder, output_lock

        target = Path(output)
        metadata = {"extra_weights": self._extra_weights} if self._extra_weights else {}
        with output_lock(target), AtomicFolder(target, force=force) as folder:
            self.loaded.adapter_object.save(self.loaded, folder, metadata)
        return target

    def pipeline(self, sampler: str = "ddim", scheduler=None):
        """A diffusers pipeline around this model (the same module, not a copy): ``DDIMPipeline`` /
        ``DDPMPipeline`` for pixel UNets, ``LDMPipeline`` for unconditional latent UNets,
        ``StableDiffusionPipeline`` for text-conditional ones. See :func:`dpcli.pipelines.build_pipeline`."""
        from dpcli.pipelines import build_pipeline

        return build_pipeline(self.loaded, sampler=sampler, scheduler=scheduler)

    def export(
        self,
        output: str | Path,
        format: str = "onnx",
        opset: int = 17,
        tolerance: float = 1e-3,
        force: bool = False,
    ) -> ExportReport:
        """What ``dp export`` does: see :func:`export`."""
        return export(self, output, format=format, opset=opset, tolerance=tolerance, force=force)


class Scores:
    """Channel importance scores of a model (what ``dp score`` computes), with the timestep scan.

    ``criterion``, ``cutoff`` (last scanned timestep, None without a scan), ``losses`` (per scanned
    timestep), ``tensors`` (one score tensor per prunable group), ``settings`` (as recorded);
    ``save(path)`` writes the file ``dp score -o`` writes; ``to_json()`` is ``dp score --json``.
    """

    def __init__(self, job_scores, model_source: str):
        self.job = job_scores
        self.model_source = model_source

    def __repr__(self) -> str:
        return f"<dpcli.Scores {self.criterion} of {self.model_source!r}, cutoff={self.cutoff}>"

    @property
    def criterion(self) -> str:
        """The criterion that computed them."""
        return self.job.criterion

    @property
    def cutoff(self) -> int | None:
        """The last timestep whose gradient was accumulated (None for criteria without a scan)."""
        return self.job.scan.cutoff if self.job.scan else None

    @property
    def losses(self) -> list[float]:
        """The loss of each scanned timestep (index = position in the scan)."""
        return list(self.job.scan.losses) if self.job.scan else []

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """One score tensor per prunable channel group."""
        return self.job.tensors

    @property
    def settings(self) -> dict:
        """The settings the scores were computed with, as recorded in the scores file."""
        return self.job.settings

    def save(self, path: str | Path) -> Path:
        """Write the scores as ``dp score -o PATH`` does (safetensors; reusable with ``dp prune --scores``)."""
        from dpcli.jobs.score import save_scores

        save_scores(self.job, Path(path), self.model_source)
        return Path(path)

    def to_json(self) -> dict:
        """What ``dp score --json`` prints for these scores."""
        from dpcli.jobs.score import ScoreReport

        return ScoreReport(self.job).to_json()


def load(
    model: str | Path,
    adapter: str | None = None,
    config: str | Path | None = None,
    scheduler: str | Path | None = None,
) -> Model:
    """Load anything dp accepts as MODEL: a diffusers model or pipeline folder, a Hub id (from the local
    Hugging Face cache), a weights file, a folder written by dp, ``config:NAME`` or ``builtin:NAME``.

    ``adapter`` forces an adapter, ``config`` gives the config of a single weights file, ``scheduler``
    (a scheduler_config.json or a folder with one) replaces the model's scheduler; as the CLI's
    ``--adapter``, ``--config`` and ``--scheduler``.
    """
    from dpcli.loading import load_model

    return Model(
        load_model(
            str(model),
            adapter=adapter,
            config=Path(config) if config is not None else None,
            scheduler=Path(scheduler) if scheduler is not None else None,
        )
    )


def _as_model(model: Model | str | Path, argument: str = "model") -> Model:
    if isinstance(model, Model):
        return model
    if isinstance(model, (str, Path)):
        return load(model)
    raise BadSetting(
        argument,
        "{" + argument + "} must be a dpcli.Model or what dpcli.load accepts",
        got=type(model).__name__,
    )


def score(
    model: Model,
    criterion: str = "diff-taylor",
    data: str | Path | DataSpec | None = None,
    threshold: float | None = None,
    calib_size: int | None = None,
    batch_size: int = 256,
    chunk: int | None = None,
    timesteps: int | None = None,
    timestep_stride: int | None = None,
    scan_budget: int | None = None,
    seed: int = 0,
    prompt: str | None = None,
    workers: int | None = None,
    ignore: list[str] | None = None,
    round_to: int | None = None,
    head_ratio: float = 0.0,
    split: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    label_column: str | None = None,
    output: str | Path | None = None,
) -> Scores:
    """Importance scores of every prunable channel group of ``model``, as ``dp score`` computes them (the
    timestep scan on ``data`` for gradient criteria). The keyword arguments are ``dp score``'s options
    (``--calib-size`` is ``calib_size``, ...); ``output`` also writes the scores file."""
    from dpcli.data.base import data_spec
    from dpcli.jobs.score import ScoreSettings, compute_scores, save_scores
    from dpcli.pruning import PruneOptions

    model = _as_model(model)
    settings = ScoreSettings(
        criterion=criterion,
        data=data_spec(data, split, image_column, caption_column, label_column),
        threshold=threshold,
        calib_size=calib_size,
        batch_size=batch_size,
        chunk=chunk,
        timesteps=timesteps,
        timestep_stride=timestep_stride,
        scan_budget=scan_budget,
        seed=seed,
        options=PruneOptions(ignore=list(ignore or []), round_to=round_to, head_ratio=head_ratio),
        prompt=prompt,
        workers=workers,
    )
    settings.validate()
    computed = compute_scores(model.loaded, settings)
    if output is not None:
        save_scores(computed, Path(output), model.source)
    return Scores(computed, model.source)


def prune(
    model: Model,
    scores: Scores | str | Path | None = None,
    *,
    criterion: str | None = None,
    ratio: float | None = None,
    target_macs: float | None = None,
    target_params: float | None = None,
    tolerance: float = 0.05,
    ignore: list[str] | None = None,
    round_to: int | None = None,
    head_ratio: float | None = None,
    seed: int = 0,
    **score_options: Any,
) -> Model:
    """Prune ``model`` IN PLACE to one of ``ratio``, ``target_macs``, ``target_params`` (as ``dp prune``)
    and return it, now recording how it was pruned (``save()`` writes the folder ``dp prune`` writes).

    ``scores`` are :func:`score`'s result or a file ``dp score`` wrote; without them, ``criterion`` and
    ``score_options`` (:func:`score`'s keyword arguments: ``data``, ``threshold``, ``calib_size``, ...) score
    the model first. ``ignore``/``round_to``/``head_ratio`` default to those the scores were computed
    with. Keep the original with ``dpcli.load`` again: pruning changes the module.
    """
    from dpcli.io.model_format import model_signature, recorded_metadata
    from dpcli.jobs.prune import PruneSettings, prune_model, pruned_metadata, validate_prune_settings
    from dpcli.jobs.score import load_scores
    from dpcli.pruning import PruneOptions

    model = _as_model(model)
    settings = PruneSettings(ratio, target_macs, target_params, tolerance)
    validate_prune_settings(settings)
    if scores is None:
        if criterion is None:
            raise BadSetting("criterion", "give {criterion} (or scores) to prune")
        scores = score(
            model,
            criterion=criterion,
            seed=seed,
            ignore=ignore,
            round_to=round_to,
            head_ratio=head_ratio or 0.0,
            **score_options,
        )
    elif score_options:
        name = sorted(score_options)[0]
        raise BadSetting(name, "{" + name + "} applies when prune computes the scores, not to given scores")
    if isinstance(scores, (str, Path)):
        scores = Scores(load_scores(Path(scores), model.loaded), model.source)
    if not isinstance(scores, Scores):
        raise BadSetting(
            "scores", "{scores} must be dpcli.score's result or a scores file", got=type(scores).__name__
        )
    if criterion is not None and criterion != scores.criterion:
        raise BadSetting(
            "criterion",
            "{criterion} {given} differs from the scores' criterion {recorded}",
            given=criterion,
            recorded=scores.criterion,
        )
    if scores.job.model_signature != model_signature(model.module):
        raise BadInput(f"the scores were computed for a model of another shape ({scores.model_source})")
    if ignore is None and round_to is None and head_ratio is None:
        options = scores.job.recorded_options()
    else:
        options = PruneOptions(ignore=list(ignore or []), round_to=round_to, head_ratio=head_ratio or 0.0)
    report = prune_model(model.loaded, scores.job, settings, options, seed=seed)
    model.loaded.pruning = recorded_metadata(
        model.loaded, pruned_metadata(report, scores.job, settings, options)
    )
    model.report = report
    return model


def finetune(
    model: Model,
    data: str | Path | DataSpec,
    steps: int,
    *,
    output: str | Path | None = None,
    batch_size: int = 16,
    lr: float = 2e-4,
    warmup: int = 0,
    schedule: str = "cosine",
    weight_decay: float = 0.0,
    ema_decay: float = 0.999,
    grad_clip: float = 1.0,
    grad_accum: int = 1,
    checkpoint_every: int = 500,
    keep_checkpoints: int = 2,
    resume: bool = False,
    seed: int = 0,
    teacher: Model | str | Path | None = None,
    distill_weight: float | None = None,
    precision: str = "fp32",
    device: str = "auto",
    reinit: bool = False,
    crop: str = "center",
    flip: bool = False,
    caption_dropout: float | None = None,
    workers: int | None = None,
    cache_latents: str | Path | None = None,
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw",
    preview: int = 0,
    force: bool = False,
    split: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    label_column: str | None = None,
    on_step=None,
) -> Model:
    """Fine-tune ``model`` on ``data`` for ``steps`` optimizer steps, as ``dp finetune`` (same keyword
    arguments as its options); returns the fine-tuned model with the EMA weights (``model``'s module is
    trained in place and ends with the raw weights).

    With ``output``, the folder ``dp finetune -o`` writes is written there (checkpoints under
    OUTPUT/checkpoints while it runs, ``resume`` continues them). Without it, checkpoints go to a temporary
    folder that is removed at the end, and ``save()`` on the result writes the model folder.
    ``on_step(info)`` is called after every step (``info.step``, ``info.loss``, ``info.lr``, ...).
    """
    from dpcli.data.base import data_spec
    from dpcli.io.model_format import recorded_metadata
    from dpcli.jobs.finetune.loop import finetune as train
    from dpcli.jobs.finetune.loop import (
        history_entry,
        open_training_data,
        prepare_output_folder,
        save_finetuned,
    )
    from dpcli.jobs.finetune.settings import FinetuneSettings
    from dpcli.runtime import start_distributed

    model = _as_model(model)
    teacher_model = _as_model(teacher, "teacher") if teacher is not None else None
    if distill_weight is None:
        distill_weight = 1.0 if teacher_model is not None else 0.0
    settings = FinetuneSettings(
        data=data_spec(data, split, image_column, caption_column, label_column),
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        warmup=warmup,
        schedule=schedule,
        weight_decay=weight_decay,
        ema_decay=ema_decay,
        grad_clip=grad_clip,
        seed=seed,
        precision=precision,
        teacher=teacher_model.source if teacher_model is not None else None,
        distill_weight=distill_weight,
        reinit=reinit,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints,
        crop=crop,
        flip=flip,
        caption_dropout=caption_dropout,
        workers=workers,
        cache_latents=str(cache_latents) if cache_latents else None,
        gradient_checkpointing=gradient_checkpointing,
        optimizer=optimizer,
    )
    if output is None and (resume or preview):
        raise BadSetting(
            "resume" if resume else "preview", "{" + ("resume" if resume else "preview") + "} needs {output}"
        )
    scratch = tempfile.TemporaryDirectory(prefix="dpcli-finetune-") if output is None else None
    target = Path(output) if output is not None else Path(scratch.name) / "run"
    try:
        inputs = {"model": model.source, "teacher": teacher_model.source if teacher_model else None}
        prepare_output_folder(settings, target, resume, force, inputs)
        dist = start_distributed(device)
        try:
            source = open_training_data(model.loaded, settings)
            result = train(
                model.loaded,
                source,
                settings,
                target,
                teacher=teacher_model.loaded if teacher_model is not None else None,
                resume=resume,
                dist=dist,
                on_step=on_step,
            )
            if output is not None and dist.is_main:
                save_finetuned(model.loaded, result, target, preview=preview)
            dist.barrier()
        finally:
            dist.close()
    finally:
        if scratch is not None:
            scratch.cleanup()
    raw = {k: v.detach().cpu().clone() for k, v in model.module.state_dict().items()}
    tuned = dataclasses.replace(model.loaded, model=result.ema_model.eval())
    tuned.pruning = recorded_metadata(tuned, {"history": [history_entry(result.report)]})
    finished = Model(tuned, extra_weights={"raw.safetensors": raw})
    finished.report = result.report
    return finished


def evaluate(
    model: Model | str | Path,
    *,
    reference: Model | str | Path | None = None,
    num_samples: int = 256,
    steps: int = 100,
    spacing: str = "uniform",
    sampler: str = "ddim",
    seed: int = 0,
    batch_size: int = 64,
    data: str | Path | DataSpec | None = None,
    fid_stats: str | Path | None = None,
    inception_weights: str | Path | None = None,
    save_stats: str | Path | None = None,
    latency: bool = True,
    latency_batch: int = 64,
    repeats: int = 5,
    device: str | None = None,
    precision: str = "auto",
    prompt: str | list[str] | None = None,
    guidance_scale: float = 1.0,
    output: str | Path | None = None,
    force: bool = False,
    split: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    label_column: str | None = None,
) -> EvalReport:
    """Sample ``model`` as ``dp eval`` does (same keyword arguments as its options; ``latency=False`` is
    ``--no-latency``): latency, FID against ``data`` or ``fid_stats``, SSIM/PSNR to ``reference`` from the
    same noise. Returns the report: ``to_json()`` is ``dp eval --json``, ``samples.images`` the uint8
    images. ``output`` also writes report.json, grid.png and samples.safetensors there. ``prompt`` and
    ``guidance_scale`` condition text models."""
    from dpcli.data.base import data_spec
    from dpcli.io.files import AtomicFolder, output_lock, prepare_output
    from dpcli.jobs.evaluate import EvalSettings, LatencySettings, write_eval_output
    from dpcli.jobs.evaluate import evaluate as run_eval
    from dpcli.sampling import SamplerSettings

    model = _as_model(model)
    reference_model = _as_model(reference, "reference") if reference is not None else None
    if output is not None:
        prepare_output(Path(output), force)
    if save_stats is not None and Path(save_stats).exists() and not force:
        raise BadSetting(
            "save_stats", "{save_stats} {path} exists (use {force} to replace it)", path=save_stats
        )
    settings = EvalSettings(
        model=model.source,
        reference=reference_model.source if reference_model is not None else None,
        num_samples=num_samples,
        sampling=SamplerSettings(
            sampler=sampler,
            steps=steps,
            spacing=spacing,
            seed=seed,
            batch_size=batch_size,
            precision=precision,
            guidance_scale=guidance_scale,
            options={"prompt": prompt} if prompt is not None else {},
        ),
        latency=LatencySettings(batch=latency_batch, repeats=repeats) if latency else None,
        data=data_spec(data, split, image_column, caption_column, label_column),
        fid_stats=Path(fid_stats) if fid_stats is not None else None,
        inception_weights=Path(inception_weights) if inception_weights is not None else None,
        save_stats=Path(save_stats) if save_stats is not None else None,
        device=device,
    )
    report = run_eval(
        settings,
        loaded=model.loaded,
        reference_loaded=reference_model.loaded if reference_model is not None else None,
    )
    if report is not None and output is not None:
        with output_lock(Path(output)), AtomicFolder(Path(output), force=force) as folder:
            write_eval_output(report, folder, final=Path(output))
    return report


def export(
    model: Model | str | Path,
    output: str | Path,
    *,
    format: str = "onnx",
    opset: int = 17,
    tolerance: float = 1e-3,
    force: bool = False,
) -> ExportReport:
    """Export the model's denoiser as ``dp export`` does: ONNX (dynamic batch; ``sample``, ``timestep`` and
    conditioning inputs; ``opset``) or TorchScript, verified against PyTorch (max abs difference at most
    ``tolerance``, else DpError and nothing written). Returns the report (``to_json()`` is ``dp export
    --json``)."""
    from dpcli.io.files import output_lock
    from dpcli.jobs.export import ExportSettings, export_model

    model = _as_model(model)
    settings = ExportSettings(format=format, opset=opset, tolerance=tolerance)
    with output_lock(Path(output)):
        return export_model(model.loaded, Path(output), settings, force=force)


def noise_generators(count: int, seed: int = 0) -> list[torch.Generator]:
    """One CPU generator per sample index 0..count-1 that starts where ``dp eval --seed SEED`` starts:
    pass them as a diffusers pipeline's ``generator`` and its starting noise is dp's, image for image."""
    from dpcli.sampling import _NOISE, sample_generator

    if count < 1:
        raise BadSetting("count", "{count} must be at least 1", got=count)
    return [sample_generator(seed, index, _NOISE) for index in range(count)]
