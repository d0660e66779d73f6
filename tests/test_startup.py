"""`dp --help` and shell completion stay fast: no torch, diffusers, timm or fvcore on their path."""

import subprocess
import sys

HEAVY = ["torch", "diffusers", "timm", "fvcore", "torch_pruning", "numpy", "safetensors", "torchvision"]

CHECK = """
import sys
from dpcli.cli.app import main
try:
    main({argv!r})
except SystemExit:
    pass
heavy = [m for m in {heavy!r} if m in sys.modules]
print("HEAVY:" + ",".join(heavy), file=sys.stderr)
"""


def heavy_modules_after(argv, env=None):
    import os

    proc = subprocess.run(
        [sys.executable, "-c", CHECK.format(argv=argv, heavy=HEAVY)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    line = [line for line in proc.stderr.splitlines() if line.startswith("HEAVY:")][-1]
    return [m for m in line[len("HEAVY:") :].split(",") if m]


def test_help_imports_no_heavy_module():
    assert heavy_modules_after(["--help"]) == []


def test_every_command_help_imports_no_heavy_module():
    from typer.main import get_command

    from dpcli.cli.app import app

    for name in get_command(app).commands:
        assert heavy_modules_after([name, "--help"]) == [], name


def test_completion_imports_no_heavy_module():
    env = {"_DP_COMPLETE": "complete_bash", "COMP_WORDS": "dp ins", "COMP_CWORD": "1"}
    assert heavy_modules_after([], env=env) == []
