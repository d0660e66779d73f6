"""Packed timestep scoring vs the reference's plain per-timestep loop, on the same model, data and cutoff.

Usage: python benchmarks/scoring.py [--quick] [--model builtin:ddpm-digits] [--chunks 1,2,4,8,16,32]
                                    [--threshold 0.05] [--calib-size 32] [--timesteps N] [--threads 1]

Runs `dp score MODEL --criterion diff-taylor --data builtin:digits --chunk C --json -o scores-C` for each
chunk size C (C timesteps x calib-size images per forward pass; C = 1 is the reference's shape: one
timestep per forward and backward). The time is the scan time `dp score` reports (`scan_seconds`: the
forward/backward passes and the cutoff test, without process start-up and model loading). Proof of
equality: every run must report the same cutoff, and its saved scores (one tensor per channel group) are
compared with the chunk-1 scores: the largest relative difference max|a-b| / max|b| over all groups is
printed (float32 summation order is the only difference).

--repeats R runs each chunk size R times in alternating order (median); the scan is deterministic, so
every repeat must give the same cutoff.
--quick: 24 timesteps, 16 calibration images, threshold 0, chunks 1,4,8, 2 repeats (a few minutes on 2 cores).
Writes benchmarks/results/scoring.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DP, machine_info, markdown_table, pyplot, write_results  # noqa: E402


def score(model: str, chunk: int, args, output: Path, env: dict) -> dict:
    command = [str(DP), "score", model, "--criterion", "diff-taylor", "--data", "builtin:digits",
               "--threshold", str(args.threshold), "--calib-size", str(args.calib_size), "--chunk", str(chunk),
               "--batch-size", str(chunk * args.calib_size), "--seed", "0", "-o", str(output), "--json"]
    if args.timesteps:
        command += ["--timesteps", str(args.timesteps)]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-2000:]}")
    report = json.loads(proc.stdout)
    report["wall_seconds"] = time.perf_counter() - started
    return report


def max_relative_difference(a: Path, b: Path) -> float:
    from safetensors.numpy import load_file

    first, second = load_file(str(a)), load_file(str(b))
    if set(first) != set(second):
        return float("inf")
    worst = 0.0
    for key, reference in second.items():
        scale = float(abs(reference).max()) or 1.0
        worst = max(worst, float(abs(first[key].astype("float64") - reference.astype("float64")).max()) / scale)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="builtin:ddpm-digits")
    parser.add_argument("--chunks", default="1,2,4,8,16,32")
    parser.add_argument("--threshold", type=float, default=0.05)
    parser.add_argument("--calib-size", type=int, default=32)
    parser.add_argument("--timesteps", type=int, default=None, help="cap the scan (default: until the cutoff)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the dp processes")
    parser.add_argument("--repeats", type=int, default=3, help="runs per chunk size (median reported)")
    args = parser.parse_args()
    if args.quick:
        args.chunks, args.calib_size, args.timesteps, args.threshold, args.repeats = "1,4,8", 16, 24, 0.0, 2
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    info = machine_info()
    info["torch_threads"] = args.threads
    chunks = [int(c) for c in args.chunks.split(",")]
    assert chunks[0] == 1, "the first chunk size must be 1 (the reference loop)"
    rows, results = [], []
    with tempfile.TemporaryDirectory() as folder:
        reports = {chunk: [] for chunk in chunks}
        for round_ in range(args.repeats):  # rounds alternate the chunk sizes: all see the same machine load
            for chunk in chunks if round_ % 2 == 0 else chunks[::-1]:
                output = Path(folder) / f"scores-{chunk}.safetensors"
                reports[chunk].append(score(args.model, chunk, args, output, env))
                print(f"round {round_ + 1}, chunk {chunk:3d}: scan {reports[chunk][-1]['scan_seconds']:7.2f} s",
                      flush=True)
        for chunk in chunks:
            times = [r["scan_seconds"] for r in reports[chunk]]
            report = reports[chunk][-1]
            difference = max_relative_difference(Path(folder) / f"scores-{chunk}.safetensors",
                                                 Path(folder) / "scores-1.safetensors")
            result = {
                "chunk": chunk,
                "scan_seconds": statistics.median(times),
                "scan_seconds_all": times,
                "wall_seconds": statistics.median(r["wall_seconds"] for r in reports[chunk]),
                "forward_passes": report["forward_passes"],
                "cutoff": report["cutoff"],
                "cutoffs_all": sorted({r["cutoff"] for r in reports[chunk]}),
                "timesteps_scanned": report["timesteps_scanned"],
                "max_relative_score_difference": difference,
            }
            result["speedup"] = results[0]["scan_seconds"] / result["scan_seconds"] if results else 1.0
            results.append(result)
            print(f"chunk {chunk:3d}: scan {result['scan_seconds']:7.2f} s (median of {len(times)}), "
                  f"{result['forward_passes']:4d} passes, cutoff {result['cutoff']}, max rel. score difference "
                  f"{difference:.1e}, speedup {result['speedup']:.2f}x", flush=True)
    cutoffs = {c for r in results for c in r["cutoffs_all"]}
    equal = len(cutoffs) == 1 and max(r["max_relative_score_difference"] for r in results) < 1e-4
    for r in results:
        rows.append([r["chunk"] if r["chunk"] > 1 else "1 (reference loop)", f"{r['scan_seconds']:.2f}",
                     r["forward_passes"], r["cutoff"], f"{r['max_relative_score_difference']:.1e}",
                     f"{r['speedup']:.2f}x"])
    best = max(results, key=lambda r: r["speedup"])
    markdown = (
        f"`dp score {args.model} --criterion diff-taylor --data builtin:digits --threshold {args.threshold:g} "
        f"--calib-size {args.calib_size}{' --timesteps ' + str(args.timesteps) if args.timesteps else ''} --chunk C`; "
        f"OMP_NUM_THREADS={args.threads}; scan seconds are medians of {args.repeats} alternating runs.\n\n"
        + markdown_table(["chunk (timesteps per pass)", "scan seconds", "passes", "cutoff",
                          "max rel. score difference vs chunk 1", "speedup"], rows)
        + f"\n\nSame cutoff in every run: {'yes' if len(cutoffs) == 1 else 'NO'}; scores equal to float "
          f"rounding (< 1e-4 relative): {'yes' if equal else 'NO'}. Best: chunk {best['chunk']}, "
          f"{best['speedup']:.2f}x faster than the per-timestep loop.\n"
    )
    print(markdown)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["chunk"] for r in results], [r["scan_seconds"] for r in results], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("timesteps packed per forward pass (1 = reference loop)")
    ax.set_ylabel("scan seconds")
    ax.set_title(f"dp score {args.model}: packed timestep scan")
    fig.tight_layout()
    name = "scoring-quick" if args.quick else "scoring"
    from _common import RESULTS

    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    write_results(name, {"settings": vars(args), "results": results, "same_cutoff": len(cutoffs) == 1,
                         "scores_equal": equal, "best_speedup": best["speedup"], "best_chunk": best["chunk"]},
                  markdown, info)


if __name__ == "__main__":
    main()
