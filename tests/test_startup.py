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


def test_the_old_module_paths_are_gone():
    # 0.1.0 never shipped dpcli.saving/workflow/training/evaluation: no shims, no deprecation period.
    # (Editable-install finders are dropped so that a PYTHONPATH checkout is tested, not the installed tree.)
    drop_editable = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]"
    for name in ("saving", "workflow", "training", "evaluation", "_deprecated"):
        code = f"{drop_editable}; import dpcli.{name}"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode == 1 and f"No module named 'dpcli.{name}'" in proc.stderr, name


def test_a_model_card_is_written_without_importing_torch(tmp_path):
    # dpcli.io.model_card reads dpcli.json through the torch-free dpcli.io.metadata, not the model format.
    from dpcli.io.metadata import FORMAT, FORMAT_VERSION, METADATA_FILE

    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "adapter": "ddpm", "history": []}
    (tmp_path / METADATA_FILE).write_text(__import__("json").dumps(metadata))
    code = (
        "import sys\nfrom dpcli.io.model_card import update_model_card\n"
        f"update_model_card({str(tmp_path)!r}, 'evaluation', 'FID 12.3')\n"
        "print(','.join(m for m in ('torch', 'diffusers', 'safetensors') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""
    assert "FID 12.3" in (tmp_path / "README.md").read_text()
