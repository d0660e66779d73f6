"""``dp export``."""

from pathlib import Path
from typing import Annotated

import typer

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
    from dpcli.cli import render as out
    from dpcli.cli.common import default_output, limit_params, lock_output
    from dpcli.cli.render.export import render_export
    from dpcli.jobs.export import ExportSettings, export_model
    from dpcli.loading import load_model

    limit_params(context, max_params)
    settings = ExportSettings(format=format, opset=opset, tolerance=tolerance)
    settings.validate()
    suffix = ".onnx" if settings.format == "onnx" else ".pt"
    target = Path(output) if output else Path(f"{default_output(model, 'unet')}{suffix}")
    lock_output(context, target)
    with out.stderr.status("Loading model"):
        loaded = load_model(model, adapter=adapter, config=config)
    with out.stderr.status(f"Exporting to {settings.format} and verifying"):
        report = export_model(loaded, target, settings, force=force).to_json()
    if json_output:
        out.print_json(report)
    else:
        render_export(report)
