"""Pieces several commands share: the scoring progress bar, interactive prompts, default output names."""

from __future__ import annotations

import sys
from pathlib import Path


def default_output(model: str, suffix: str) -> Path:
    """``NAME-SUFFIX`` in the current folder for MODEL (a path, a Hub id or ``builtin:NAME``)."""
    return Path(f"{Path(model.rstrip('/')).name.replace(':', '-')}-{suffix}")


# Options that only the command line has: how the result is shown (--json, --summary), whether to ask
# (--yes); see the parity test, tests/test_api.py. ``context`` is Typer's.
CLI_ONLY = ("context", "json_output", "summary", "yes")


def api_keywords(command, arguments: dict) -> dict:
    """The parsed options of ``command`` (a Typer command function; ``arguments`` its ``locals()``) as the
    keywords of its ``dpcli`` function: the command's parameters but the CLI-only ones."""
    import inspect

    names = set(inspect.signature(command).parameters) - set(CLI_ONLY)
    return {name: value for name, value in arguments.items() if name in names}


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


def ask_target() -> float:
    """Ask for a MACs target (fraction kept)."""
    import typer

    return typer.prompt("Keep what fraction of the MACs? (e.g. 0.5)", type=float, default=0.5, err=True)


def confirm_plan(loaded, criterion: str, options: dict, output_path) -> None:
    """Show what ``dp prune`` with ``options`` (its keywords) will do to ``loaded`` and ask to go on."""
    import typer

    from dpcli.cli import render as output
    from dpcli.jobs.prune import measure

    params, macs = measure(loaded)
    if options["ratio"] is not None:
        goal = f"remove {options['ratio']:.0%} of the channels in every prunable layer"
    elif options["target_macs"] is not None:
        goal = f"keep ~{options['target_macs']:.0%} of the MACs (~{output.fmt_count(macs * options['target_macs'], 'MAC')})"
    else:
        goal = f"keep ~{options['target_params']:.0%} of the params (~{output.fmt_count(params * options['target_params'])})"
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


def call_and_render(api_function, options: dict, render, json_output: bool, to_json=None) -> None:
    """The end of every command: call ``api_function`` (a ``dpcli`` function) with ``options`` and a Rich
    reporter, then on the main process print its result's JSON (``--json``) or ``render`` it.
    ``to_json(result)`` makes the JSON (default ``result.to_json()``); a result of None (torchrun ranks
    other than 0) prints nothing."""
    from dpcli.cli import render as out
    from dpcli.cli.reporter import RichReporter, is_main_rank

    with RichReporter() as reporter:
        result = api_function(**options, reporter=reporter)
    if result is None or not is_main_rank():
        return
    report = to_json(result) if to_json is not None else result.to_json()
    if json_output:
        out.print_json(report)
    else:
        render(report)
