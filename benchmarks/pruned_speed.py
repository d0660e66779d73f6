"""Is a pruned model really faster? The CIFAR-10 DDPM config pruned to several MACs targets.

Usage: python benchmarks/pruned_speed.py [--quick] [--model config:ddpm-cifar10-32]
                                         [--targets 0.8,0.7,0.6,0.5,0.4,0.3] [--batch 32] [--repeats 5] [--threads 1]

For each target: `dp prune MODEL --criterion magnitude --target-macs T --tolerance 1 --json` (magnitude:
no data needed, and the criterion does not change the sizes; --tolerance 1 accepts the closest reachable
size: GroupNorm groups quantise what can be reached, and the table reports what was achieved). Then one
`dp compare MODEL PRUNED... --json` times a denoising step (model + DDIM update) of every model at batch 1
and at --batch (2 warm-up steps, --repeats timed steps, median) in one process, one model after another.
Reported: params, MACs (fraction kept), ms/step, speedup, and speedup / MACs-ratio (1.0 = the model is
exactly as much faster as its MACs say). Random weights: timing does not depend on them.

--quick: targets 0.56,0.3, batch 8, 3 repeats. Writes benchmarks/results/pruned_speed.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DP, RESULTS, machine_info, markdown_table, pyplot, write_results  # noqa: E402


def dp_json(args: list[str], env: dict) -> dict:
    proc = subprocess.run([str(DP), *args, "--json"], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"dp {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="config:ddpm-cifar10-32")
    parser.add_argument("--targets", default="0.8,0.7,0.6,0.5,0.4,0.3")
    parser.add_argument("--batch", type=int, default=32, help="the throughput batch (batch 1 is always timed)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the dp processes")
    parser.add_argument("--plot-only", type=Path, help="only redraw the PNG of this result JSON")
    args = parser.parse_args()
    if args.plot_only:
        plot(args.plot_only)
        return
    if args.quick:
        args.targets, args.batch, args.repeats = "0.56,0.3", 8, 3
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    info = machine_info()
    info["torch_threads"] = args.threads
    targets = [float(t) for t in args.targets.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        pruned = {}
        for target in targets:
            out = Path(folder) / f"pruned-{target:g}"
            pruned[target] = dp_json(["prune", args.model, "--criterion", "magnitude", "--target-macs", str(target),
                                      "--tolerance", "1", "--yes", "-o", str(out)], env)
            print(f"target {target:g}: ratio {pruned[target]['ratio']:.4f}, "
                  f"{pruned[target]['macs_fraction']:.1%} of the MACs", flush=True)
        compare = dp_json(["compare", args.model, *(str(Path(folder) / f"pruned-{t:g}") for t in targets),
                           "--num-samples", "1", "--steps", "1", "--latency-batch", str(args.batch),
                           "--repeats", str(args.repeats), "--precision", "fp32"], env)
    rows, results = [], []
    for target, row in zip([None, *targets], compare["models"], strict=True):
        latency = row["latency"]
        result = {
            "target_macs": target,
            "ratio": pruned[target]["ratio"] if target else 0.0,
            "params": row["params"],
            "macs": row["macs"],
            "macs_fraction": row["macs_fraction"],
            "batch_1_ms": latency["batch_1_ms"],
            "batch_ms": latency["batch_ms"],
            "speedup_batch_1": row["speedup_batch_1"],
            "speedup_batch": row["speedup_batch"],
            "speedup_per_macs_ratio_batch_1": row["speedup_per_macs_ratio_batch_1"],
            "speedup_per_macs_ratio_batch": row["speedup_per_macs_ratio_batch"],
        }
        results.append(result)
        rows.append([
            "original" if target is None else f"{target:g}", f"{result['ratio']:.3f}", f"{row['params'] / 1e6:.2f} M",
            f"{row['macs'] / 1e9:.3f} G ({row['macs_fraction']:.1%})", f"{latency['batch_1_ms']:.1f}",
            f"{latency['batch_ms']:.0f}", f"{row['speedup_batch_1']:.2f}x", f"{row['speedup_batch']:.2f}x",
            f"{row['speedup_per_macs_ratio_batch_1']:.2f}", f"{row['speedup_per_macs_ratio_batch']:.2f}"])
    markdown = (
        f"`dp prune {args.model} --criterion magnitude --target-macs T --tolerance 1`, then `dp compare` "
        f"(ms per denoising step, median of {args.repeats} after 2 warm-up steps; OMP_NUM_THREADS={args.threads}, "
        f"fp32, CPU).\n\n"
        + markdown_table(["target MACs", "ratio", "params", "MACs (kept)", "ms/step b1", f"ms/step b{args.batch}",
                          "speedup b1", f"speedup b{args.batch}", "speedup/MACs-ratio b1",
                          f"speedup/MACs-ratio b{args.batch}"], rows)
        + "\n"
    )
    print(markdown)
    name = "pruned_speed-quick" if args.quick else "pruned_speed"
    write_results(name, {"settings": vars(args), "results": results}, markdown, info)
    plot(RESULTS / f"{name}.json")


def plot(result_file: Path) -> None:
    """speedup and speedup / MACs-ratio vs MACs kept, from a result JSON, into the PNG beside it."""
    data = json.loads(result_file.read_text())
    args = argparse.Namespace(**data["settings"])
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    pruned_rows = data["results"][1:]
    fractions = [r["macs_fraction"] for r in pruned_rows]
    for key, label in (("batch_1", "batch 1"), ("batch", f"batch {args.batch}")):
        axes[0].plot(fractions, [r[f"speedup_{key}"] for r in pruned_rows], marker="o", label=label)
        axes[1].plot(fractions, [r[f"speedup_per_macs_ratio_{key}"] for r in pruned_rows], marker="o", label=label)
    ideal = [min(fractions) + i * (1 - min(fractions)) / 50 for i in range(51)]
    axes[0].plot(ideal, [1 / x for x in ideal], color="0.6", linestyle="--", label="ideal (1 / MACs kept)")
    axes[1].axhline(1.0, color="0.6", linestyle="--")
    axes[0].set_ylabel("speedup")
    axes[1].set_ylabel("speedup / MACs-ratio (1 = ideal)")
    for ax in axes:
        ax.set_xlabel("MACs kept")
        ax.legend(fontsize=8)
    fig.suptitle(f"{args.model} pruned (magnitude): measured CPU speed, {args.threads} thread(s)")
    fig.tight_layout()
    fig.savefig(result_file.with_suffix(".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
