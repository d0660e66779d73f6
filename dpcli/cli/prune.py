"""``dp prune``."""

from pathlib import Path
from typing import Annotated

import typer

from dpcli.cli.options import (
    DATA_OPTIONS,
    LOAD_OPTIONS,
    SCAN_OPTIONS,
    WEIGHTS_OPTIONS,
    Criterion,
    Force,
    Json,
    Layout,
    ModelArgument,
    Output,
    Ratio,
    TargetMacs,
    TargetParams,
    Yes,
    with_options,
)

ScoresFile = Annotated[
    Path | None, typer.Option("--scores", help="Reuse scores written by dp score instead of computing them.")
]
Tolerance = Annotated[
    float,
    typer.Option("--tolerance", min=0.0, max=1.0, help="How close (relative) a searched target must land."),
]


@with_options(DATA_OPTIONS, SCAN_OPTIONS, LOAD_OPTIONS, WEIGHTS_OPTIONS)
def prune(
    context: typer.Context,
    model: ModelArgument,
    criterion: Criterion = None,
    ratio: Ratio = None,
    target_macs: TargetMacs = None,
    target_params: TargetParams = None,
    scores: ScoresFile = None,
    output: Output = None,
    layout: Layout = "free",
    tolerance: Tolerance = 0.05,
    yes: Yes = False,
    force: Force = False,
    json_output: Json = False,
    **options,
) -> None:
    """Prune a model to --ratio / --target-macs / --target-params with a criterion; save it safely.

    Under torchrun the scoring scan is shared out over the processes; rank 0 alone prunes, writes and
    prints (the other processes end after the scan)."""
    import os

    import dpcli
    from dpcli.cli.common import (
        api_keywords,
        ask_criterion,
        ask_data,
        ask_target,
        call_and_render,
        confirm_plan,
        default_output,
        interactive,
    )
    from dpcli.cli.render.prune import render_prune
    from dpcli.cli.reporter import RichReporter
    from dpcli.errors import BadInput
    from dpcli.plugins import get_registry

    can_ask = interactive() and not yes and not json_output and os.environ.get("WORLD_SIZE", "1") == "1"
    if criterion is None and scores is None:
        if not can_ask:
            raise BadInput("--criterion is required (or --scores FILE); see dp plugins for the choices")
        criterion = ask_criterion()
    if ratio is None and target_macs is None and target_params is None:
        if not can_ask:
            raise BadInput("give one of --ratio, --target-macs, --target-params")
        target_macs = ask_target()
    if (
        scores is None
        and options["data"] is None
        and can_ask
        and get_registry().criterion(criterion).needs_data
    ):
        options["data"] = ask_data(criterion)
    output = Path(output) if output else default_output(model, "pruned")
    keywords = api_keywords(prune, {**locals(), **options})
    if can_ask:
        from dpcli.io.files import prepare_output

        prepare_output(output, force)  # before the question, not after it
        load_options = {name: keywords.pop(name) for name in (*LOAD_OPTIONS, *WEIGHTS_OPTIONS)}
        with RichReporter() as reporter:
            keywords["model"] = dpcli.load(model, **load_options, reporter=reporter)
        confirm_plan(keywords["model"].loaded, criterion or f"the scores in {scores}", keywords, output)

    def to_json(pruned) -> dict:
        return pruned.report.to_json(output=output)

    call_and_render(dpcli.prune, keywords, render_prune, json_output, to_json)
