"""``dp export``."""

from pathlib import Path
from typing import Annotated

import typer

from dpcli.cli.common import api_keywords, default_output
from dpcli.cli.options import Adapter, Config, Force, Json, MaxParams, ModelArgument, Output

Format = Annotated[str, typer.Option("--format", help="onnx, or torchscript (a traced torch.jit file).")]
Opset = Annotated[int, typer.Option("--opset", help="ONNX opset version (14 or more).")]
Tolerance = Annotated[
    float,
    typer.Option(
        "--tolerance", help="Largest max abs difference to PyTorch the verification accepts (else exit 1)."
    ),
]


def export(
    context: typer.Context,
    model: ModelArgument,
    output: Output = None,
    format: Format = "onnx",
    opset: Opset = 17,
    tolerance: Tolerance = 1e-3,
    force: Force = False,
    adapter: Adapter = None,
    config: Config = None,
    max_params: MaxParams = None,
    json_output: Json = False,
) -> None:
    """Export the UNet to ONNX (dynamic batch; timestep and conditioning inputs), verified with onnxruntime."""
    output = (
        Path(output) if output else Path(f"{default_output(model, 'unet')}.{_SUFFIX.get(format, 'onnx')}")
    )
    options = api_keywords(export, locals())
    import dpcli
    from dpcli.cli import render as out
    from dpcli.cli.render.export import render_export
    from dpcli.cli.reporter import RichReporter

    with RichReporter() as reporter:
        report = dpcli.export(**options, reporter=reporter).to_json()
    if json_output:
        out.print_json(report)
    else:
        render_export(report)


_SUFFIX = {"torchscript": "pt"}
