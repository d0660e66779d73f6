"""``dp slice``."""

from pathlib import Path
from typing import Annotated

import typer

from dpcli.cli.options import Force, Json, Output

AddonArgument = Annotated[
    Path,
    typer.Argument(help="A LoRA (.safetensors, diffusers/PEFT or kohya layout) or a ControlNetModel folder."),
]
PrunedModel = Annotated[
    Path, typer.Option("--model", help="The pruned dpcli model folder the add-on should fit.")
]


def slice_addon_command(
    context: typer.Context,
    addon: AddonArgument,
    model: PrunedModel,
    output: Output = None,
    force: Force = False,
    json_output: Json = False,
) -> None:
    """Carry a LoRA or ControlNet made for the original model onto a pruned one (its kept channels)."""
    import dpcli
    from dpcli.cli import render as out
    from dpcli.cli.common import default_output
    from dpcli.cli.reporter import RichReporter

    target = Path(output) if output else default_output(str(Path(addon).with_suffix("")), "sliced")
    with RichReporter() as reporter:
        report = dpcli.slice(addon, model, target, force=force, reporter=reporter).to_json()
    if json_output:
        out.print_json(report)
        return
    out.stdout.print(
        f"{report['kind']} sliced for {report['model']}: {report['modules_sliced']} modules sliced, "
        f"{report['modules_unchanged']} unchanged, {report['modules_dropped']} dropped; "
        f"{report['params_before']:,} -> {report['params_after']:,} parameters; written to {report['output']}"
    )
    for note in report["notes"]:
        out.stderr.print(f"note: {note}")
