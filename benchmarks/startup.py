"""CLI start-up: wall time of `dp --help`, `dp inspect --help` and `dp plugins` vs a bare `python -c pass`.

Usage: python benchmarks/startup.py [--quick] [--runs 10]

Each command runs --runs times (round-robin, so all see the same machine load) after one untimed warm-up
(file cache); the median wall time and the median CPU time of the child (user + sys: what load on a
shared machine does not inflate) are reported, and the overhead over bare Python start-up.
(benchmarks/plugin_startup.py measures the same with the example third-party plugins installed.)

--quick: 5 runs. Writes benchmarks/results/startup.{json,md,png}. Imports no torch itself.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DP, RESULTS, machine_info, markdown_table, pyplot, write_results  # noqa: E402

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "dp --help": [str(DP), "--help"],
    "dp inspect --help": [str(DP), "inspect", "--help"],
    "dp plugins": [str(DP), "plugins"],
}


def timed(command: list[str]) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, capture_output=True, check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    if args.quick:
        args.runs = 5
    info = machine_info(torch_info=False)
    for command in COMMANDS.values():
        timed(command)  # warm-up
    walls = {name: [] for name in COMMANDS}
    cpus = {name: [] for name in COMMANDS}
    for _ in range(args.runs):
        for name, command in COMMANDS.items():
            wall, cpu = timed(command)
            walls[name].append(wall * 1000)
            cpus[name].append(cpu * 1000)
    results = {name: {"wall_ms": statistics.median(walls[name]), "cpu_ms": statistics.median(cpus[name]),
                      "wall_ms_all": walls[name], "cpu_ms_all": cpus[name]} for name in COMMANDS}
    bare = results["python -c pass"]
    rows = [[f"`{name}`", f"{r['wall_ms']:.0f}", f"{r['cpu_ms']:.0f}", f"{r['wall_ms'] - bare['wall_ms']:+.0f}"]
            for name, r in results.items()]
    markdown = (f"Medians of {args.runs} round-robin runs after a warm-up.\n\n"
                + markdown_table(["command", "wall ms", "CPU ms (child)", "wall over bare python"], rows) + "\n")
    print(markdown)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(results)
    ax.barh(names, [results[n]["wall_ms"] for n in names], label="wall")
    ax.barh(names, [results[n]["cpu_ms"] for n in names], height=0.4, label="CPU (child)")
    ax.set_xlabel("ms (median)")
    ax.legend()
    ax.set_title("CLI start-up")
    fig.tight_layout()
    name = "startup-quick" if args.quick else "startup"
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    write_results(name, {"settings": vars(args), "results": results}, markdown, info)


if __name__ == "__main__":
    main()
