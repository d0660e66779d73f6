"""Shell completion: the shipped scripts are current, and bash completion really completes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHELLS = {"bash": "dp.bash", "zsh": "dp.zsh", "fish": "dp.fish"}


def complete(env: dict) -> str:
    code = "from dpcli.cli.app import main\ntry:\n    main([])\nexcept SystemExit:\n    pass\n"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}
    )
    return proc.stdout


@pytest.mark.parametrize("shell", sorted(SHELLS))
def test_shipped_completion_scripts_are_current(shell):
    generated = complete({"_DP_COMPLETE": f"source_{shell}"})
    shipped = (ROOT / "completions" / SHELLS[shell]).read_text()
    assert generated == shipped, f"completions/{SHELLS[shell]} is stale: run `make completions`"


def test_bash_completes_command_names():
    words = complete({"_DP_COMPLETE": "complete_bash", "COMP_WORDS": "dp ins", "COMP_CWORD": "1"})
    assert words.split() == ["inspect"]


def test_bash_completes_options():
    words = complete({"_DP_COMPLETE": "complete_bash", "COMP_WORDS": "dp inspect --de", "COMP_CWORD": "2"})
    assert "--depth" in words.split()
