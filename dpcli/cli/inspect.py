"""``dp inspect``."""

from typing import Annotated

import typer

from dpcli.cli.options import LOAD_OPTIONS, Json, ModelArgument, with_options


@with_options(LOAD_OPTIONS)
def inspect(
    context: typer.Context,
    model: ModelArgument,
    depth: Annotated[
        int | None,
        typer.Option("--depth", min=1, help="Group rows into blocks by the first N parts of the path."),
    ] = None,
    json_output: Json = False,
    **options,
) -> None:
    """Show what is in a model: params, MACs, resolution, scheduler, and a per-layer table."""
    from dpcli.cli import render as output
    from dpcli.cli.common import limit_params
    from dpcli.cli.render.inspect import render_inspect
    from dpcli.inspection import inspect_model
    from dpcli.loading import load_model

    limit_params(context, options.pop("max_params"))

    with output.stderr.status("Loading model and counting MACs"):
        loaded = load_model(model, **options)
        report = inspect_model(loaded, depth=depth)
    if json_output:
        output.print_json(report)
    else:
        render_inspect(report)
