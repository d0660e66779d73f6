"""The ``dp`` Typer app and its entry point, which owns error handling and exit codes."""

from __future__ import annotations

import os
import sys
import traceback

import typer

from dpcli import __version__
from dpcli.cli import compare as compare_command
from dpcli.cli import eval as eval_command
from dpcli.cli import export as export_command
from dpcli.cli import finetune as finetune_command
from dpcli.cli import inspect as inspect_command
from dpcli.cli import plugins as plugins_command
from dpcli.cli import prune as prune_command
from dpcli.cli import score as score_command
from dpcli.cli import slice as slice_command
from dpcli.cli.options import Json

state = {"debug": os.environ.get("DPCLI_DEBUG", "") not in ("", "0")}

app = typer.Typer(
    name="dp",
    help="Prune diffusion models structurally (Diff-Pruning), fine-tune, evaluate and compare them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)


@app.callback()
def root(
    debug: bool = typer.Option(
        False, "--debug", help="Show full tracebacks on errors.", envvar="DPCLI_DEBUG"
    ),
) -> None:
    """Prune diffusion models structurally (Diff-Pruning), fine-tune, evaluate and compare them."""
    state["debug"] = debug


@app.command()
def version(json_output: Json = False) -> None:
    """Show the versions of dp and the libraries it relies on."""
    from importlib import metadata

    from dpcli.cli import render as output

    versions = {"dpcli": __version__}
    for package in ("torch", "diffusers", "torch-pruning", "timm", "fvcore", "typer"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    if json_output:
        output.print_json(versions)
    else:
        output.stdout.print("  ".join(f"{name} {v or 'missing'}" for name, v in versions.items()))


app.command("inspect")(inspect_command.inspect)
app.command("score")(score_command.score)
app.command("prune")(prune_command.prune)
app.command("finetune")(finetune_command.finetune)
app.command("eval")(eval_command.evaluate)
app.command("compare")(compare_command.compare)
app.command("export")(export_command.export)
app.command("slice")(slice_command.slice_addon_command)
app.command("plugins")(plugins_command.plugins)


def main(argv: list[str] | None = None) -> None:
    """Run ``dp``: user mistakes become one line and exit 2, other failures exit 1, never a traceback
    unless ``--debug``."""
    from dpcli.cli.errors import message
    from dpcli.errors import EXIT_FAILURE, DpError

    if argv is None:
        argv = sys.argv[1:]
    state["debug"] = state["debug"] or "--debug" in argv
    try:
        app(args=argv, prog_name="dp")
    except DpError as exc:
        _fail(message(exc), exc.exit_code, exc)
    except KeyboardInterrupt:
        _fail("interrupted", 130, None)
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        _fail(f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)", EXIT_FAILURE, exc)


def _fail(message: str, code: int, exc: BaseException | None) -> None:
    from dpcli.cli import render as output

    if state["debug"] and exc is not None:
        traceback.print_exception(exc)
    output.error(message.splitlines()[0] if message else "failed")
    sys.exit(code)
