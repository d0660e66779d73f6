"""Start-up cost of third-party plugins: `dp --help` and `dp plugins` (median of 5 runs each), without
and with the example plugins (plugins/dpcli-obd, plugins/dpcli-dit) pip-installed into a temporary
`--target` folder on PYTHONPATH (the environment itself is not touched).

Recorded on the development machine (2 CPU cores shared with other jobs; load average in brackets),
medians of 5, wall time (CPU time of the child):
    [6.4] without plugins  dp --help 353 ms (179 ms)  dp plugins 538 ms (273 ms)
          with both        dp --help 389 ms (189 ms)  dp plugins 567 ms (276 ms)
    [8.2] without plugins  dp --help 356 ms           dp plugins 553 ms
          with both        dp --help 366 ms           dp plugins 527 ms
    [7.9] without plugins  dp --help 581 ms (313 ms)  dp plugins 986 ms (488 ms)
          with both        dp --help 516 ms (266 ms)  dp plugins 971 ms (498 ms)
Wall time follows the machine's load, not the plugins: `dp --help` imports no plugin (they load lazily,
when a command needs the registry; tests/test_plugin_packages.py checks it), and `dp plugins` imports
both plugin modules, which import no torch.
"""

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DP = Path(sys.executable).with_name("dp")
EXAMPLES = ["dpcli-obd", "dpcli-dit"]


def median_ms(args, env, runs=5):
    """Median wall time and median CPU time (user + sys of the child: what load on a shared machine
    does not inflate), in ms."""
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([str(DP), *args], capture_output=True, check=True, env=env)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls) * 1000, statistics.median(cpus) * 1000


def install_examples(folder: Path) -> Path:
    sources = []
    for name in EXAMPLES:
        copy = folder / "src" / name
        shutil.copytree(ROOT / "plugins" / name, copy, ignore=shutil.ignore_patterns("*.egg-info", "build"))
        sources.append(str(copy))
    target = folder / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), *sources],
        check=True,
    )
    return target


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as temporary:
        target = install_examples(Path(temporary))
        base = {k: v for k, v in os.environ.items() if k not in ("DPCLI_PLUGINS", "DPCLI_DISABLE_PLUGINS")}
        with_plugins = {
            **base,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(target), base.get("PYTHONPATH")])),
        }
        for label, env in (("without plugins", base), ("with both", with_plugins)):
            (help_wall, help_cpu), (plugins_wall, plugins_cpu) = (
                median_ms(["--help"], env),
                median_ms(["plugins"], env),
            )
            print(
                f"{label:16s}  dp --help {help_wall:.0f} ms (cpu {help_cpu:.0f} ms)   "
                f"dp plugins {plugins_wall:.0f} ms (cpu {plugins_cpu:.0f} ms)   medians of 5"
            )
