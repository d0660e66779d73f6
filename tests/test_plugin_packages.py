"""Real plugin packages, really pip-installed: misbehaving ones are isolated, the examples work end to end.

The packages in tests/plugin_packages/ and the example plugins in plugins/ are installed with
``pip install --no-deps --target DIR`` and DIR is put on PYTHONPATH of a fresh ``python -m dpcli``, so
dp discovers them through their entry points exactly as in a user's environment (and this environment
is left untouched).
"""

import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from dpcli.testing import Result, make_image_folder, save_tiny_unet

# pip-installs six packages into a temporary folder, then runs dp in fresh interpreters.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
MISBEHAVING = ["dpcli-broken-import", "dpcli-raising-hook", "dpcli-taken-name", "dpcli-twin"]
EXAMPLES = ["dpcli-obd", "dpcli-dit"]
PLUGIN_MODULES = ["dpcli_broken_import", "dpcli_raising_hook", "dpcli_taken_name", "dpcli_twin", "dpcli_obd"]


def setuptools_builds_wheels() -> bool:
    """setuptools ≥ 70.1 builds wheels by itself (older ones need the wheel package, which venvs lack)."""
    try:
        version = metadata.version("setuptools")
    except metadata.PackageNotFoundError:
        return False
    major, minor = (int(re.match(r"\d+", part).group()) for part in (version.split(".") + ["0"])[:2])
    return (major, minor) >= (70, 1)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A PYTHONPATH with all six packages pip-installed into a temporary target folder."""
    root = tmp_path_factory.mktemp("plugin-install")
    sources = []
    for name in MISBEHAVING + EXAMPLES:
        origin = ROOT / "tests" / "plugin_packages" / name if name in MISBEHAVING else ROOT / "plugins" / name
        copy = root / "src" / name  # build from a copy: setuptools writes build files next to the sources
        shutil.copytree(origin, copy, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
        sources.append(str(copy))
    target = root / "site"
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target)]
    if setuptools_builds_wheels():
        command.append("--no-build-isolation")  # build with the setuptools at hand, no download
    proc = subprocess.run([*command, *sources], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return os.pathsep.join([str(target), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])


def dp(pythonpath, *args, **env):
    """``python -m dpcli ARGS`` with the installed packages visible (and only the plugin variables given)."""
    full = {k: v for k, v in os.environ.items() if k not in ("DPCLI_PLUGINS", "DPCLI_DISABLE_PLUGINS")}
    full.update(PYTHONPATH=pythonpath, **env)
    proc = subprocess.run(
        [sys.executable, "-m", "dpcli", *map(str, args)],
        capture_output=True,
        text=True,
        env=full,
        timeout=600,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def test_help_works_and_imports_no_plugin(installed):
    code = (
        "import sys\nfrom dpcli.cli.app import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print('IMPORTED:' + ','.join(m for m in {PLUGIN_MODULES!r} if m in sys.modules), file=sys.stderr)"
    )
    env = {**os.environ, "PYTHONPATH": installed}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "plugins" in proc.stdout and "prune" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == "IMPORTED:"


def test_dp_plugins_reports_each_failure_with_its_package(installed):
    result = dp(installed, "plugins", "--json")
    assert result.exit_code == 0, result.stderr
    plugins = {p["package"]: p for p in result.json["plugins"] if not p["builtin"]}
    broken = plugins["dpcli-broken-import"]
    assert broken["status"] == "failed" and broken["version"] == "0.1.0"
    assert "import failed" in broken["error"] and "dpcli_missing_dependency" in broken["error"]
    raising = plugins["dpcli-raising-hook"]
    assert raising["status"] == "failed" and "the plugin's registry is corrupt" in raising["error"]
    assert not any(row["name"] == "half-done" for row in result.json["criteria"])

    table = dp(installed, "plugins")
    assert table.exit_code == 0
    assert "failed plugin broken-import (dpcli-broken-import 0.1.0)" in table.stdout
    assert "failed plugin raising-hook (dpcli-raising-hook 0.2.0)" in table.stdout


def test_name_collisions_name_both_packages(installed):
    criteria = dp(installed, "plugins", "--json").json["criteria"]
    magnitude = [row for row in criteria if row["name"] == "magnitude"]
    assert {(row["package"], row["status"]) for row in magnitude} == {
        ("dpcli", "ok"),
        ("dpcli-taken-name", "rejected"),
    }
    rejected = next(row for row in magnitude if row["status"] == "rejected")
    assert "'dpcli-taken-name'" in rejected["error"] and "'dpcli'" in rejected["error"]
    twins = [row for row in criteria if row["name"] == "twin"]
    assert {row["status"] for row in twins} == {"conflict"} and len(twins) == 2

    result = dp(installed, "score", "config:ddpm-digits", "--criterion", "twin")
    assert result.exit_code == 2
    assert "'dpcli-taken-name'" in result.stderr and "'dpcli-twin'" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_examples_are_listed_as_third_party_with_versions(installed):
    data = dp(installed, "plugins", "--json").json
    obd = next(row for row in data["criteria"] if row["name"] == "obd")
    dit = next(row for row in data["adapters"] if row["name"] == "dit")
    assert (obd["package"], obd["version"], obd["builtin"], obd["status"]) == (
        "dpcli-obd",
        "0.1.0",
        False,
        "ok",
    )
    assert (dit["package"], dit["version"], dit["builtin"], dit["status"]) == (
        "dpcli-dit",
        "0.1.0",
        False,
        "ok",
    )


def test_commands_keep_working_and_the_installed_criterion_prunes(installed, tmp_path):
    model = save_tiny_unet(tmp_path / "unet")
    data = make_image_folder(tmp_path / "images", count=4)
    scored = dp(installed, "score", model, "--criterion", "magnitude", "--json")
    assert scored.exit_code == 0 and scored.json["criterion"] == "magnitude"  # the built-in, not the impostor
    pruned = dp(
        installed,
        "prune",
        model,
        "--criterion",
        "obd",
        "--data",
        data,
        "--calib-size",
        "2",
        "--timesteps",
        "3",
        "--ratio",
        "0.3",
        "-o",
        tmp_path / "out",
        "--yes",
        "--json",
    )
    assert pruned.exit_code == 0, pruned.stderr
    assert pruned.json["criterion"] == "obd" and pruned.json["params_after"] < pruned.json["params_before"]


def test_plugins_can_be_disabled_or_selected(installed):
    disabled = dp(installed, "plugins", "--json", DPCLI_DISABLE_PLUGINS="1").json
    assert {p["status"] for p in disabled["plugins"] if not p["builtin"]} == {"disabled"}
    assert (
        dp(
            installed, "score", "config:ddpm-digits", "--criterion", "obd", DPCLI_DISABLE_PLUGINS="1"
        ).exit_code
        == 2
    )

    only = dp(installed, "plugins", "--json", DPCLI_PLUGINS="dpcli-twin,obd").json
    status = {p["package"]: p["status"] for p in only["plugins"] if not p["builtin"]}
    assert status["dpcli-twin"] == status["dpcli-obd"] == "ok"
    assert status["dpcli-broken-import"] == status["dpcli-taken-name"] == "disabled"
    twin = [row for row in only["criteria"] if row["name"] == "twin"]
    assert [(row["package"], row["status"]) for row in twin] == [("dpcli-twin", "ok")]
