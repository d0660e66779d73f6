"""Options shared by several commands, defined once (names are a contract: see DESIGN.md)."""

from pathlib import Path
from typing import Annotated

import typer

Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
Adapter = Annotated[
    str | None,
    typer.Option("--adapter", help="Model adapter to use instead of detecting one (see dp plugins)."),
]
Config = Annotated[
    Path | None,
    typer.Option(
        "--config", help="Model config (config.json or a folder) for single weight files.", show_default=False
    ),
]
Output = Annotated[Path | None, typer.Option("--output", "-o", help="Where to write the result.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed: data order, noise and timesteps.")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Never prompt; fail if something is missing.")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite a non-empty output folder.")]
Data = Annotated[
    str | None,
    typer.Option("--data", help="Image folder (recursive; png/jpg/jpeg/webp/bmp) or builtin:digits."),
]
ModelArgument = Annotated[
    str,
    typer.Argument(help="Model folder, pipeline folder, weights file, Hub id, config:NAME or builtin:NAME."),
]
