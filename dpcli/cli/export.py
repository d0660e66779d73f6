"""``dp export``."""

from pathlib import Path
from typing import Annotated

import typer

from dpcli.cli.common import api_keywords, call_and_render, default_output
from dpcli.cli.options import LOAD_OPTIONS, Force, Json, ModelArgument, Output, pick, with_options

Format = Annotated[str, typer.Option("--format", help="onnx, or torchscript (a traced torch.jit file).")]
Opset = Annotated[int, typer.Option("--opset", help="ONNX opset version (14 or more).")]
Tolerance = Annotated[
    float,
    typer.Option(
        "--tolerance", help="Largest max abs difference to PyTorch the verification accepts (else exit 1)."
    ),
]


@with_options(pick(LOAD_OPTIONS, "adapter", "config", "max_params"))
def export(
    context: typer.Context,
    model: ModelArgument,
    output: Output = None,
    format: Format = "onnx",
    opset: Opset = 17,
    tolerance: Tolerance = 1e-3,
    force: Force = False,
    json_output: Json = False,
    **options,
) -> None:
    """Export the UNet to ONNX (dynamic batch; timestep and conditioning inputs), verified with onnxruntime."""
    output = (
        Path(output) if output else Path(f"{default_output(model, 'unet')}.{_SUFFIX.get(format, 'onnx')}")
    )
    import dpcli
    from dpcli.cli.render.export import render_export

    keywords = api_keywords(export, {**locals(), **options})
    call_and_render(dpcli.export, keywords, render_export, json_output)


_SUFFIX = {"torchscript": "pt"}
