"""Peak memory of the timestep scan with and without --gradient-checkpointing, on the CPU.

Usage: python benchmarks/scan_memory.py [--model config:ddpm-cifar10-32] [--samples 8,32] [--threads 1]

Each run is a fresh `dp score MODEL --data builtin:digits --calib-size N --timesteps 1 --threshold 0` (one
forward and backward of N samples, diff-taylor) under /usr/bin/time; the peak is the process's max RSS.
Two sample counts give the activation memory per sample (the slope) apart from what every run holds
(weights, gradients, libraries: the intercept). Writes benchmarks/results/scan_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_table, write_results  # noqa: E402


def peak_rss(model: str, samples: int, checkpointing: bool, threads: int) -> dict:
    """One `dp score` run: its max RSS (MB), wall time and JSON report."""
    command = [sys.executable, "-m", "dpcli", "score", model, "--data", "builtin:digits", "--calib-size",
               str(samples), "--timesteps", "1", "--threshold", "0", "--device", "cpu", "--json"]
    if checkpointing:
        command.append("--gradient-checkpointing")
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as measured:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        started = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", measured.name, *command], capture_output=True,
                              text=True, env=env)
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(proc.stderr)
        kilobytes = int(measured.read().strip().splitlines()[-1])
    report = json.loads(proc.stdout)
    return {"samples": samples, "checkpointing": checkpointing, "peak_rss_mb": kilobytes / 1024,
            "seconds": seconds, "scan_seconds": report["scan_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="config:ddpm-cifar10-32")
    parser.add_argument("--samples", default="8,32")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    info = machine_info()
    counts = [int(n) for n in args.samples.split(",")]
    runs = [peak_rss(args.model, n, on, args.threads) for on in (False, True) for n in counts]
    rows, slopes = [], {}
    for on in (False, True):
        mine = [r for r in runs if r["checkpointing"] == on]
        low, high = mine[0], mine[-1]
        slopes[on] = (high["peak_rss_mb"] - low["peak_rss_mb"]) / (high["samples"] - low["samples"])
        for r in mine:
            rows.append(["on" if on else "off", r["samples"], f"{r['peak_rss_mb']:.0f}", f"{r['scan_seconds']:.1f}"])
    lines = [
        f"`dp score {args.model} --data builtin:digits --calib-size N --timesteps 1 --threshold 0` "
        "(one forward + backward of N samples), peak RSS of the process:",
        "",
        markdown_table(["gradient checkpointing", "samples per pass", "peak RSS (MB)", "scan (s)"], rows),
        "",
        f"Activation memory per sample (slope): {slopes[False]:.1f} MB without, {slopes[True]:.1f} MB with "
        "gradient checkpointing.",
    ]
    write_results("scan_memory", {"runs": runs, "mb_per_sample": {"off": slopes[False], "on": slopes[True]}},
                  "\n".join(lines), info)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
