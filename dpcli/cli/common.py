"""Pieces several commands share: the scoring progress bar, interactive prompts, default output names."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path


def default_output(model: str, suffix: str) -> Path:
    """``NAME-SUFFIX`` in the current folder for MODEL (a path, a Hub id or ``builtin:NAME``)."""
    return Path(f"{Path(model.rstrip('/')).name.replace(':', '-')}-{suffix}")


@contextmanager
def scan_progress(loaded, settings):
    """A progress bar over timesteps with the current loss; yields the callback the scan calls.

    Criteria that need no gradients get no bar (and a None callback)."""
    from dpcli.cli import render as output
    from dpcli.plugins import get_registry

    if not get_registry().criterion(settings.criterion).needs_gradients:
        yield None
        return
    total = int(settings.timesteps or loaded.scheduler.config.num_train_timesteps)
    with output.progress(extra=("loss",)) as bar:
        task = bar.add_task("Timestep scan", total=total, loss="")

        def on_progress(step: int, loss: float) -> None:
            bar.update(task, completed=step + 1, loss=f"t={step} loss={loss:.4f}")

        yield on_progress
        bar.update(task, total=bar.tasks[0].completed or total)


def interactive() -> bool:
    """Prompting is allowed only with a terminal on both ends."""
    return sys.stdin.isatty() and sys.stderr.isatty()


def ask_criterion() -> str:
    """Pick a criterion from the registry, with one-line descriptions."""
    import typer

    from dpcli.cli import render as output
    from dpcli.plugins import get_registry

    criteria = get_registry().usable("criterion")
    names = sorted(criteria, key=lambda n: (n != "diff-taylor", n))
    for index, name in enumerate(names, 1):
        output.stderr.print(f"  [bold]{index}[/] {name}: {criteria[name].description}")
    choice = typer.prompt("Criterion (number or name)", default="1", err=True)
    if choice.isdigit() and 1 <= int(choice) <= len(names):
        return names[int(choice) - 1]
    return choice


def ask_data(criterion: str) -> str:
    """Ask for calibration data when the chosen criterion needs it."""
    import typer

    return typer.prompt(f"{criterion} needs calibration images: folder or builtin:digits", err=True)


def ask_target(tolerance: float):
    """Ask for a MACs target (fraction kept)."""
    import typer

    from dpcli.jobs.prune import PruneSettings

    value = typer.prompt("Keep what fraction of the MACs? (e.g. 0.5)", type=float, default=0.5, err=True)
    return PruneSettings(target_macs=value, tolerance=tolerance)


def confirm_plan(loaded, criterion: str, settings, params: int, macs: int, output_path) -> None:
    """Show what will happen and ask to go on."""
    import typer

    from dpcli.cli import render as output

    if settings.ratio is not None:
        goal = f"remove {settings.ratio:.0%} of the channels in every prunable layer"
    elif settings.target_macs is not None:
        goal = f"keep ~{settings.target_macs:.0%} of the MACs (~{output.fmt_count(macs * settings.target_macs, 'MAC')})"
    else:
        goal = f"keep ~{settings.target_params:.0%} of the params (~{output.fmt_count(params * settings.target_params)})"
    output.stderr.print(
        f"Plan: prune {loaded.source} ({output.fmt_count(params)} params, {output.fmt_count(macs, 'MAC')}) "
        f"with [bold]{criterion}[/] to {goal}; write {output_path}"
    )
    if not typer.confirm("Go on?", default=True, err=True):
        raise typer.Exit(1)


def limit_params(context, max_params: int | None) -> None:
    """Refuse models above ``max_params`` parameters until the command of ``context`` ends
    (``dpcli.sizing``)."""
    from dpcli.sizing import params_limit

    context.with_resource(params_limit(max_params))


def lock_output(context, target: Path) -> None:
    """Hold the output lock of ``target`` until the command of ``context`` (its ``typer.Context``) ends
    (``dpcli.io.files.output_lock``): a second dp writing the same output stops with exit code 2, even
    with --force."""
    from dpcli.cli import render as output
    from dpcli.io.files import output_lock

    context.with_resource(output_lock(target, on_note=output.warn))
