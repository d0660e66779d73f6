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
from pathlib import Path
from typing import TYPE_CHECKING

from dpcli.errors import BadSetting

if TYPE_CHECKING:
    import torch

    from dpcli.adapters.base import LoadedModel
    from dpcli.data.base import DataSpec
    from dpcli.jobs.evaluate import EvalReport
    from dpcli.jobs.export import ExportReport
    from dpcli.reporting import Reporter


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
        return self.loaded.adapter_name

    @property
    def record(self) -> dict | None:
        """How the model was made, as its folder's ``dpcli.json`` records it (``base``, ``pruning``,
        ``sizes``, ``history``, ``original_modules``); None for a model dp has not changed or saved."""
        return self.loaded.record

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
            self.loaded.adapter.save(self.loaded, folder, metadata)
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

    def __init__(self, job_scores, model_source: str, report=None):
        self.job = job_scores
        self.model_source = model_source
        # The score job's report (``dpcli.jobs.score.ScoreReport``: the files written), when it ran here.
        self.report = report

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

        return (self.report or ScoreReport(self.job)).to_json()


def load(
    model: str | Path,
    adapter: str | None = None,
    config: str | Path | None = None,
    scheduler: str | Path | None = None,
    max_params: int | None = None,
    *,
    weights_dtype: str | None = None,
    reporter: Reporter | None = None,
) -> Model:
    """Load anything dp accepts as MODEL: a diffusers model or pipeline folder, a Hub id (from the local
    Hugging Face cache), a weights file, a folder written by dp, ``config:NAME`` or ``builtin:NAME``.

    ``adapter`` forces an adapter, ``config`` gives the config of a single weights file, ``scheduler``
    (a scheduler_config.json or a folder with one) replaces the model's scheduler, ``max_params`` refuses
    a model with more parameters before building it; as the CLI's ``--adapter``, ``--config``,
    ``--scheduler`` and ``--max-params``. The functions below that take a model path take these keywords
    too and pass them here. ``weights_dtype`` (``--weights-dtype`` of score and prune: fp32, bf16 or fp16)
    builds and loads the weights in that dtype, never through a float32 copy (SDXL in bf16: 5.1 GB, not
    10.3 GB).
    """
    from dpcli.loading import load_model
    from dpcli.sizing import params_limit

    if reporter is not None:
        reporter.status(f"Loading {model}")
    with params_limit(max_params):
        return Model(
            load_model(
                str(model),
                adapter=adapter,
                config=Path(config) if config is not None else None,
                scheduler=Path(scheduler) if scheduler is not None else None,
                weights_dtype=weights_dtype,
            )
        )


def _as_model(
    model: Model | str | Path, argument: str = "model", reporter: Reporter | None = None, **load_options
) -> Model:
    """``model``, or what :func:`load` makes of a path with ``load_options`` (which only a path takes)."""
    if isinstance(model, Model):
        given = sorted(name for name, value in load_options.items() if value is not None)
        if given:
            raise BadSetting(
                given[0], "{" + given[0] + "} applies when {" + argument + "} is a path, not a loaded model"
            )
        return model
    if isinstance(model, (str, Path)):
        return load(model, reporter=reporter, **load_options)
    raise BadSetting(
        argument,
        "{" + argument + "} must be a dpcli.Model or what dpcli.load accepts",
        got=type(model).__name__,
    )


def score(
    model: Model | str | Path,
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
    on_bad_sample: str | None = None,
    max_bad_fraction: float | None = None,
    output: str | Path | None = None,
    *,
    device: str = "auto",
    precision: str = "fp32",
    gradient_checkpointing: bool = False,
    grad_sum_dtype: str = "fp32",
    plot: str | Path | None = None,
    adapter: str | None = None,
    config: str | Path | None = None,
    scheduler: str | Path | None = None,
    max_params: int | None = None,
    weights_dtype: str | None = None,
    reporter: Reporter | None = None,
) -> Scores:
    """Importance scores of every prunable channel group of ``model``, as ``dp score`` computes them (the
    timestep scan on ``data`` for gradient criteria). The keyword arguments are ``dp score``'s options
    (``--calib-size`` is ``calib_size``, ...); ``output`` also writes the scores file, ``plot`` the loss
    curve. ``reporter`` (a ``dpcli.reporting.Reporter``) hears the scan's progress."""
    from dpcli.jobs import score as job

    settings = job.ScoreSettings(
        **_options(locals(), job.ScoreSettings, "model", "output", "plot", "reporter", *_LOAD_OPTIONS)
    )
    settings.validate()  # before the model is loaded
    model = _as_model(model, reporter=reporter, **_load_options(locals()))
    report = job.run(model.loaded, settings, output=output, plot=plot, reporter=reporter)
    return Scores(report.scores, model.source, report)


def prune(
    model: Model | str | Path,
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
    data: str | Path | DataSpec | None = None,
    split: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    label_column: str | None = None,
    on_bad_sample: str | None = None,
    max_bad_fraction: float | None = None,
    workers: int | None = None,
    threshold: float | None = None,
    calib_size: int | None = None,
    batch_size: int = 256,
    chunk: int | None = None,
    timesteps: int | None = None,
    timestep_stride: int | None = None,
    scan_budget: int | None = None,
    prompt: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
    layout: str = "free",
    gradient_checkpointing: bool = False,
    grad_sum_dtype: str = "fp32",
    output: str | Path | None = None,
    force: bool = False,
    adapter: str | None = None,
    config: str | Path | None = None,
    scheduler: str | Path | None = None,
    max_params: int | None = None,
    weights_dtype: str | None = None,
    reporter: Reporter | None = None,
) -> Model:
    """Prune ``model`` IN PLACE to one of ``ratio``, ``target_macs``, ``target_params`` (as ``dp prune``)
    and return it, now recording how it was pruned (``save()`` writes the folder ``dp prune`` writes;
    ``output`` writes it now, ``force`` over a non-empty folder). ``report`` on the result is the
    ``PruneReport`` (``to_json()`` is ``dp prune --json``).

    ``scores`` are :func:`score`'s result or a file ``dp score`` wrote; without them, ``criterion`` and the
    scoring keywords (:func:`score`'s: ``data``, ``threshold``, ``calib_size``, ...) score the model first.
    ``ignore``/``round_to``/``head_ratio`` default to those the scores were computed with. Keep the
    original with ``dpcli.load`` again: pruning changes the module. ``layout="diffusers"`` (``dp prune
    --layout``) gives one width per UNet level, a config plain diffusers loads (``dpcli.layout``).
    """
    from dpcli.jobs import prune as job
    from dpcli.jobs.score import ScoreSettings

    settings = job.PruneSettings(
        **_options(
            locals(), job.PruneSettings, "model", "scores", "output", "force", "reporter", *_LOAD_OPTIONS
        )
    )
    if scores is not None:
        _refuse_scoring_options(locals(), ScoreSettings)
    settings.validate(scores_given=scores is not None)  # before the model is loaded
    if isinstance(scores, Scores):
        scores = scores.job
    elif scores is not None and not isinstance(scores, (str, Path)):
        raise BadSetting(
            "scores", "{scores} must be dpcli.score's result or a scores file", got=type(scores).__name__
        )
    model = _as_model(model, reporter=reporter, **_load_options(locals()))
    # None on a torchrun rank other than 0, which ends after the scan
    model.report = job.run(
        model.loaded, settings, scores=scores, output=output, force=force, reporter=reporter
    )
    return model


_LOAD_OPTIONS = ("adapter", "config", "scheduler", "max_params", "weights_dtype")


def _load_options(arguments: dict) -> dict:
    """The :func:`load` keywords among a function's ``arguments``."""
    return {name: arguments[name] for name in _LOAD_OPTIONS if name in arguments}


def _text(path: str | Path | None) -> str | None:
    return str(path) if path is not None else None


def _options(arguments: dict, settings_class, *leave_out: str) -> dict:
    """The keyword ``arguments`` of an API function that are fields of its job's ``settings_class``."""
    names = {f.name for f in dataclasses.fields(settings_class)} - set(leave_out)
    return {name: value for name, value in arguments.items() if name in names}


def _refuse_scoring_options(arguments: dict, score_settings) -> None:
    """Given scores were computed already: a scoring keyword away from its default is a mistake."""
    shared = {"criterion", "seed", "ignore", "round_to", "head_ratio", "threshold"}
    for option in dataclasses.fields(score_settings):
        if option.name in shared or option.name not in arguments:
            continue
        if arguments[option.name] != option.default:
            raise BadSetting(
                option.name,
                "{" + option.name + "} applies when prune computes the scores, not to given scores",
            )


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
    report_to: str | None = None,
    validate_every: int = 0,
    validation_samples: int = 16,
    validation_prompt: list[str] | tuple[str, ...] = (),
    force: bool = False,
    split: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    label_column: str | None = None,
    on_bad_sample: str | None = None,
    max_bad_fraction: float | None = None,
    on_step=None,
    adapter: str | None = None,
    config: str | Path | None = None,
    max_params: int | None = None,
    reporter: Reporter | None = None,
) -> Model:
    """Fine-tune ``model`` on ``data`` for ``steps`` optimizer steps, as ``dp finetune`` (same keyword
    arguments as its options); returns the fine-tuned model with the EMA weights (``model``'s module is
    trained in place and ends with the raw weights).

    With ``output``, the folder ``dp finetune -o`` writes is written there (checkpoints under
    OUTPUT/checkpoints while it runs, ``resume`` continues them). Without it, checkpoints go to a temporary
    folder that is removed at the end, and ``save()`` on the result writes the model folder.
    ``reporter`` (a ``dpcli.reporting.Reporter``) hears every step through ``step(info)`` (``info.step``,
    ``info.loss``, ``info.lr``, ...); ``on_step(info)`` is a shortcut for a reporter that only does that.
    """
    from dpcli.io.model_format import recorded_metadata
    from dpcli.jobs import finetune as job
    from dpcli.jobs.finetune.loop import history_entry
    from dpcli.jobs.finetune.loop import validate as validate_finetune
    from dpcli.jobs.finetune.settings import FinetuneSettings
    from dpcli.reporting import StepCallback

    if on_step is not None:
        if reporter is not None:
            raise BadSetting("on_step", "give {on_step} or {reporter}, not both")
        reporter = StepCallback(on_step)
    teacher_source = teacher.source if isinstance(teacher, Model) else teacher
    settings = FinetuneSettings(
        **_options({**locals(), "teacher": teacher_source}, FinetuneSettings, "model", *_LOAD_OPTIONS)
    )
    # before the model is loaded: the settings, and --resume with a checkpoint to resume
    validate_finetune(settings, Path(output) if output is not None else None, resume)
    model = _as_model(model, reporter=reporter, adapter=adapter, config=config, max_params=max_params)
    teacher_model = (
        _as_model(teacher, "teacher", reporter, max_params=max_params) if teacher is not None else None
    )
    result = job.run(
        model.loaded,
        settings,
        teacher=teacher_model.loaded if teacher_model is not None else None,
        output=Path(output) if output is not None else None,
        resume=resume,
        force=force,
        preview=preview,
        reporter=reporter,
    )
    raw = {k: v.detach().cpu().clone() for k, v in model.module.state_dict().items()}
    tuned = dataclasses.replace(model.loaded, model=result.ema_model.eval())
    tuned.record = recorded_metadata(tuned, {"history": [history_entry(result.report)]})
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
    prompt: str | list[str] | None = None,
    prompts: str | Path | None = None,
    negative_prompt: str | None = None,
    guidance_scale: float | None = None,
    class_label: int | list[int] | None = None,
    clip_model: str | None = None,
    batch_size: int = 64,
    data: str | Path | DataSpec | None = None,
    split: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    label_column: str | None = None,
    on_bad_sample: str | None = None,
    max_bad_fraction: float | None = None,
    fid_stats: str | Path | None = None,
    inception_weights: str | Path | None = None,
    save_stats: str | Path | None = None,
    latency: bool = True,
    latency_batch: int = 64,
    repeats: int = 5,
    device: str | None = None,
    precision: str = "auto",
    output: str | Path | None = None,
    force: bool = False,
    adapter: str | None = None,
    config: str | Path | None = None,
    scheduler: str | Path | None = None,
    max_params: int | None = None,
    reporter: Reporter | None = None,
) -> EvalReport:
    """Sample ``model`` as ``dp eval`` does (same keyword arguments as its options; ``latency=False`` is
    ``--no-latency``): latency, FID against ``data`` or ``fid_stats``, CLIP score for text models,
    SSIM/PSNR to ``reference`` from the same noise. ``prompt`` (one or a list; sample i gets prompt i mod
    P), ``prompts`` (a file), ``negative_prompt``, ``guidance_scale`` (None: the model's default) and
    ``class_label`` condition the samples, checked against the model as the CLI checks them. Returns the
    report: ``to_json()`` is ``dp eval --json``, ``samples.images`` the uint8 images. ``output`` also
    writes report.json, grid.png and samples.safetensors there. ``scheduler`` replaces the scheduler of
    the model and of the reference (loaded from paths)."""
    from dpcli.jobs import evaluate as job

    settings = job.EvalSettings(
        **_options(locals(), job.EvalSettings, "model", "reference", "output", "force", *_LOAD_OPTIONS),
        reference=reference.source if isinstance(reference, Model) else _text(reference),
    )
    settings.validate()  # before the models are loaded
    model = _as_model(model, reporter=reporter, **_load_options(locals()))
    reference_model = None
    if reference is not None:
        reference_model = _as_model(
            reference, "reference", reporter, scheduler=scheduler, max_params=max_params
        )
    return job.run(
        model.loaded,
        settings,
        reference=reference_model.loaded if reference_model is not None else None,
        output=output,
        force=force,
        reporter=reporter,
    )


def compare(
    models: list[Model | str | Path] | None = None,
    *,
    report: list[str | Path] | None = None,
    num_samples: int = 8,
    steps: int | None = None,
    spacing: str | None = None,
    sampler: str | None = None,
    seed: int | None = None,
    prompt: str | list[str] | None = None,
    prompts: str | Path | None = None,
    negative_prompt: str | None = None,
    guidance_scale: float | None = None,
    class_label: int | list[int] | None = None,
    mixed_protocols: bool = False,
    retime_reports: bool = False,
    batch_size: int = 64,
    latency_batch: int = 64,
    repeats: int = 5,
    latency: bool = True,
    device: str | None = None,
    precision: str = "auto",
    scheduler: str | Path | None = None,
    output: str | Path | None = None,
    force: bool = False,
    max_params: int | None = None,
    reporter: Reporter | None = None,
):
    """Compare models side by side as ``dp compare`` does (same keyword arguments as its options; ``models``
    are its MODEL arguments, loaded models or paths, ``report`` its ``--report`` files): size, MACs,
    latency, speedup, per-block widths, SSIM/PSNR to the first from the same noise and conditions.
    ``steps``/``spacing``/``sampler``/``seed`` left unset take a first report's settings (else DDIM, 100
    uniform steps, seed 0). ``retime_reports`` loads each report's model again and times every model
    here, round-robin, instead of taking the latencies the reports recorded. Returns the comparison
    (``to_json()`` is ``dp compare --json``); ``output`` also writes report.json and the grid there."""
    from dpcli.jobs import compare as job
    from dpcli.jobs.evaluate import EvalSettings
    from dpcli.sizing import params_limit

    chosen = {"steps": steps, "spacing": spacing, "sampler": sampler, "seed": seed}
    given = EvalSettings(
        **{name: value for name, value in chosen.items() if value is not None},
        prompt=prompt, prompts=prompts, negative_prompt=negative_prompt, guidance_scale=guidance_scale,
        class_label=class_label, batch_size=batch_size, latency_batch=latency_batch, repeats=repeats,
        latency=latency, precision=precision,
    )  # fmt: skip
    request = given.conditioning
    settings = job.CompareSettings(
        models=[entry.loaded if isinstance(entry, Model) else str(entry) for entry in models or []],
        reports=[Path(path) for path in report or []],
        num_samples=num_samples,
        sampling=given.sampling,
        latency=given.latency_settings,
        device=device,
        scheduler=Path(scheduler) if scheduler is not None else None,
        conditioning=request,
        mixed_protocols=mixed_protocols,
        retime_reports=retime_reports,
    )
    explicit = any(value is not None for value in chosen.values()) or not request.is_empty
    with params_limit(max_params):
        return job.run(
            settings,
            explicit_sampling=explicit,
            output=Path(output) if output is not None else None,
            force=force,
            reporter=reporter,
        )


def export(
    model: Model | str | Path,
    output: str | Path,
    *,
    format: str = "onnx",
    opset: int = 17,
    tolerance: float = 1e-3,
    force: bool = False,
    adapter: str | None = None,
    config: str | Path | None = None,
    max_params: int | None = None,
    reporter: Reporter | None = None,
) -> ExportReport:
    """Export the model's denoiser as ``dp export`` does: ONNX (dynamic batch; ``sample``, ``timestep`` and
    conditioning inputs; ``opset``) or TorchScript, verified against PyTorch (max abs difference at most
    ``tolerance``, else DpError and nothing written). Returns the report (``to_json()`` is ``dp export
    --json``)."""
    from dpcli.jobs import export as job

    settings = job.ExportSettings(format=format, opset=opset, tolerance=tolerance)
    settings.validate()  # before the model is loaded
    model = _as_model(model, reporter=reporter, adapter=adapter, config=config, max_params=max_params)
    return job.run(model.loaded, settings, output=Path(output), force=force, reporter=reporter)


def noise_generators(count: int, seed: int = 0) -> list[torch.Generator]:
    """One CPU generator per sample index 0..count-1 that starts where ``dp eval --seed SEED`` starts:
    pass them as a diffusers pipeline's ``generator`` and its starting noise is dp's, image for image."""
    from dpcli.sampling import _NOISE, sample_generator

    if count < 1:
        raise BadSetting("count", "{count} must be at least 1", got=count)
    return [sample_generator(seed, index, _NOISE) for index in range(count)]
