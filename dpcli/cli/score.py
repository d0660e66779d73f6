"""``dp score``."""

import typer

from dpcli.cli.common import api_keywords, call_and_render
from dpcli.cli.options import (
    DATA_OPTIONS,
    LOAD_OPTIONS,
    SCAN_OPTIONS,
    WEIGHTS_OPTIONS,
    Criterion,
    Json,
    ModelArgument,
    Output,
    Plot,
    with_options,
)


@with_options(DATA_OPTIONS, SCAN_OPTIONS, LOAD_OPTIONS, WEIGHTS_OPTIONS)
def score(
    context: typer.Context,
    model: ModelArgument,
    criterion: Criterion = "diff-taylor",
    output: Output = None,
    plot: Plot = None,
    json_output: Json = False,
    **options,
) -> None:
    """Compute channel importance (and the per-timestep loss curve with its cutoff); save it for dp prune.

    Under torchrun the calibration images are shared out over the processes; rank 0 writes and prints."""
    import dpcli
    from dpcli.cli.render.score import render_score

    keywords = api_keywords(score, {**locals(), **options})
    call_and_render(dpcli.score, keywords, render_score, json_output)
