"""The finetune job: ``run`` (the entry the Python API calls), ``settings`` (``FinetuneSettings``), ``loop``
(``train``, ``save_finetuned``) and ``checkpoints`` (exact resume)."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from dpcli.errors import BadSetting

if TYPE_CHECKING:
    from dpcli.adapters.base import LoadedModel
    from dpcli.jobs.finetune.loop import FinetuneResult
    from dpcli.jobs.finetune.settings import FinetuneSettings
    from dpcli.reporting import Reporter


def run(
    loaded: LoadedModel,
    settings: FinetuneSettings,
    *,
    teacher: LoadedModel | None = None,
    output: Path | None = None,
    resume: bool = False,
    force: bool = False,
    preview: int = 0,
    reporter: Reporter | None = None,
) -> FinetuneResult:
    """The finetune job: train ``loaded.model`` in place on ``settings.data`` on ``settings.device`` (data
    parallel under torchrun), with checkpoints in OUTPUT/checkpoints, then write the fine-tuned folder to
    ``output`` (locked; the main process writes). ``resume`` continues OUTPUT's newest intact checkpoint;
    a fresh run needs OUTPUT empty or ``force``; ``preview`` writes that many samples to samples.png.
    Without ``output``, checkpoints go to a temporary folder removed at the end and nothing is written."""
    from dpcli.io.files import output_lock
    from dpcli.jobs.finetune.loop import open_training_data, prepare_output_folder, save_finetuned, train
    from dpcli.reporting import Reporter, silent
    from dpcli.runtime import start_distributed

    reporter = silent(reporter)
    if output is None and (resume or preview):
        name = "resume" if resume else "preview"
        raise BadSetting(name, "{" + name + "} needs {output}")
    if output is None and (settings.validate_every or settings.report_to not in (None, "none")):
        name = "validate_every" if settings.validate_every else "report_to"
        raise BadSetting(name, "{" + name + "} writes into the run's folder: it needs {output}")
    with contextlib.ExitStack() as stack:
        if output is None:
            target = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dpcli-finetune-"))) / "run"
        else:
            target = Path(output)
            stack.enter_context(output_lock(target, on_note=reporter.warn))
        inputs = {"model": loaded.source, "teacher": teacher.source if teacher is not None else None}
        prepare_output_folder(settings, target, resume, force, inputs)
        dist = start_distributed(settings.device)
        stack.callback(dist.close)
        shown = reporter if dist.is_main else Reporter()
        shown.status("Opening the data")
        source = open_training_data(loaded, settings)
        with shown.progress("Fine-tuning", settings.steps) as advance:

            def on_step(info) -> None:
                note = f"loss {info.smoothed_loss:.4f}  lr {info.lr:.2e}  {info.steps_per_second:.2f} it/s"
                if info.bad_samples:
                    note += f"  {info.bad_samples} bad sample(s) skipped"
                advance(completed=info.step, note=note)
                shown.step(info)

            result = train(
                loaded, source, settings, target, teacher=teacher, resume=resume, dist=dist, on_step=on_step,
                on_warning=shown.warn,
            )  # fmt: skip
        if output is not None and dist.is_main:
            shown.status("Saving")
            save_finetuned(loaded, result, target, preview=preview)
        dist.barrier()
    return result
