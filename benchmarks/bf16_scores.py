"""Do bf16 weights pick the same channels as float32? Scores of long timestep scans in three precisions.

Usage: python benchmarks/bf16_scores.py [--quick] [--model builtin:ddpm-digits] [--data builtin:digits]
                                        [--scans NAME,...] [--modes NAME,...] [--ratios 0.3,0.5] [--threads 1]

``--weights-dtype bf16`` builds the model in bf16, so the scan's ``.grad`` is bf16 and the sum of the
timesteps' gradients (g = Σ_t ∇L_t) can be rounded to bf16's 8-bit significand at every addition
(``--grad-sum-dtype weights``) or summed in float32 (``fp32``, the default). This scores the same model on
the same calibration images and noise (same seeds) in each mode:

- ``fp32``: float32 weights, float32 forward (the reference);
- ``autocast``: float32 weights, ``--precision bf16`` (bf16 forward, float32 gradients);
- ``bf16``: ``--weights-dtype bf16 --precision bf16`` (bf16 weights, gradients summed in float32: the
  default ``--grad-sum-dtype fp32``);
- ``bf16-bf16sum``: the same with ``grad_sum_dtype="weights"`` (the scan sums in bf16 ``.grad``);
- ``fp32-seed1``: float32, but another calibration draw (``--seed 1``): how far the scores move when only
  the calibration images and noise change, for scale;

and compares each mode's scores with ``fp32``'s: Spearman rank correlation per prunable group (mean and
minimum over groups), the relative L2 difference of the scores, and the overlap of the channels pruned at
each ``--ratios`` (``|pruned ∩ pruned_fp32| / |pruned_fp32|`` over all pruned output channels), all through
``dpcli.load``/``dpcli.score``/``dpcli.prune``. bf16 additions = backward passes of the scan (timesteps /
chunk × micro-batches). Every pruning is done on a float32 load of the model, so only the scores differ.

Scans (``--scans``): ``dt-t100-c1`` (diff-taylor, threshold 0, 100 timesteps, chunk 1, 8 images),
``dt-t1000-c1`` (1000 timesteps), ``dt-t1000-chunk`` (the default chunk), ``dt-t1000-c1-x4`` (32 images
in micro-batches of 8: 4 backward passes per timestep), ``taylor-t1000-c1`` (taylor, all 1000 timesteps),
``dt-default`` (diff-taylor at its default threshold, chunk 1).

Default scans: all but dt-t1000-c1-x4 (4000 backward passes per mode: run it with --scans and --name).
--quick: dt-t100-c1 and dt-t1000-c1 only. Writes benchmarks/results/NAME.{json,md} (--name, default
bf16_scores; quick: bf16_scores-quick).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_table, write_results  # noqa: E402

SCANS = {
    "dt-t100-c1": {"criterion": "diff-taylor", "threshold": 0.0, "timesteps": 100, "chunk": 1, "calib_size": 8},
    "dt-t1000-c1": {"criterion": "diff-taylor", "threshold": 0.0, "timesteps": 1000, "chunk": 1, "calib_size": 8},
    "dt-t1000-chunk": {"criterion": "diff-taylor", "threshold": 0.0, "timesteps": 1000, "calib_size": 8},
    "dt-t1000-c1-x4": {"criterion": "diff-taylor", "threshold": 0.0, "timesteps": 1000, "chunk": 1,
                       "calib_size": 32, "batch_size": 8},
    "taylor-t1000-c1": {"criterion": "taylor", "timesteps": 1000, "chunk": 1, "calib_size": 8},
    "dt-default": {"criterion": "diff-taylor", "chunk": 1, "calib_size": 8},
}
MODES = {
    "fp32": {"weights_dtype": None, "precision": "fp32"},
    "autocast": {"weights_dtype": None, "precision": "bf16"},
    "bf16": {"weights_dtype": "bf16", "precision": "bf16"},
    "bf16-bf16sum": {"weights_dtype": "bf16", "precision": "bf16", "grad_sum_dtype": "weights"},
    "fp32-seed1": {"weights_dtype": None, "precision": "fp32", "seed": 1},
}


def ranks(values: list[float]) -> list[float]:
    """Ranks 0..n-1, ties sharing their mean rank (bf16 scores do tie)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            result[order[position]] = (start + end) / 2
        start = end + 1
    return result


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    n = len(ra)
    mean = (n - 1) / 2
    cov = sum((x - mean) * (y - mean) for x, y in zip(ra, rb, strict=True))
    var_a = sum((x - mean) ** 2 for x in ra)
    var_b = sum((y - mean) ** 2 for y in rb)
    return cov / (var_a * var_b) ** 0.5 if var_a and var_b else 1.0


def pruned_sets(args, scores, ratio: float) -> dict[str, set[int]]:
    """The output channels dpcli.prune removes from a float32 load of the model with ``scores``."""
    import dpcli

    model = dpcli.prune(dpcli.load(args.model), scores=scores, ratio=ratio)
    report = model.report
    widths = {row["name"]: row["original_out_channels"] for row in report.layers if row.get("original_out_channels")}
    removed = {}
    for module, sides in report.kept_channels.items():
        if "out" in sides and module in widths:
            removed[module] = set(range(widths[module])) - set(sides["out"])
    return removed


def score(args, scan: dict, mode: dict):
    import dpcli

    settings = dict(scan)
    keywords = {k: v for k, v in mode.items() if k not in ("weights_dtype",)}
    model = dpcli.load(args.model, weights_dtype=mode["weights_dtype"])
    started, cpu = time.perf_counter(), time.process_time()
    scores = dpcli.score(model, data=args.data, **settings, **keywords)
    return scores, time.perf_counter() - started, time.process_time() - cpu


def compare(reference, other) -> dict:
    """Spearman per group (mean, min) and relative L2 difference of ``other``'s scores from ``reference``'s."""
    import torch

    correlations, differences = [], []
    for name, tensor in reference.tensors.items():
        a = tensor.double().flatten()
        b = other.tensors[name].double().flatten()
        if a.numel() > 1:
            correlations.append(spearman(a.tolist(), b.tolist()))
        if a.norm() > 0:
            differences.append(float((a - b).norm() / a.norm()))
    return {
        "spearman_mean": sum(correlations) / len(correlations),
        "spearman_min": min(correlations),
        "relative_l2_mean": sum(differences) / len(differences),
        "relative_l2_max": max(differences),
        "dtype": str(next(iter(other.tensors.values())).dtype).replace("torch.", ""),
        "finite": all(bool(torch.isfinite(t).all()) for t in other.tensors.values()),
    }


def overlap(reference: dict[str, set[int]], other: dict[str, set[int]]) -> float:
    total = sum(len(channels) for channels in reference.values())
    common = sum(len(channels & other.get(module, set())) for module, channels in reference.items())
    return common / total if total else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="builtin:ddpm-digits")
    parser.add_argument("--data", default="builtin:digits")
    parser.add_argument("--scans", default=",".join(name for name in SCANS if name != "dt-t1000-c1-x4"))
    parser.add_argument("--name", default="bf16_scores", help="result file name (without extension)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--ratios", default="0.3,0.5")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    if args.quick:
        args.scans = "dt-t100-c1,dt-t1000-c1"
    import torch

    torch.set_num_threads(args.threads)
    info = machine_info()
    ratios = [float(r) for r in args.ratios.split(",")]
    modes = [m for m in args.modes.split(",") if m != "fp32"]
    rows, results = [], []
    for scan_name in args.scans.split(","):
        scan = SCANS[scan_name]
        reference, seconds, cpu = score(args, scan, MODES["fp32"])
        reference_sets = {ratio: pruned_sets(args, reference, ratio) for ratio in ratios}
        entry = {"scan": scan_name, "settings": scan, "cutoff": reference.cutoff,
                 "additions": reference.job.scan.forward_passes, "modes": {}}
        entry["modes"]["fp32"] = {"seconds": seconds, "cpu_seconds": cpu}
        print(f"{scan_name}: fp32 cutoff {reference.cutoff}, {entry['additions']} backward passes, "
              f"{seconds:.1f} s", flush=True)
        for mode_name in modes:
            scores, seconds, cpu = score(args, scan, MODES[mode_name])
            result = compare(reference, scores)
            for ratio in ratios:
                result[f"overlap_{ratio}"] = overlap(reference_sets[ratio], pruned_sets(args, scores, ratio))
            result.update(seconds=seconds, cpu_seconds=cpu, cutoff=scores.cutoff)
            entry["modes"][mode_name] = result
            rows.append([scan_name, entry["additions"], mode_name, f"{result['spearman_mean']:.4f}",
                         f"{result['spearman_min']:.4f}", f"{result['relative_l2_mean']:.4f}",
                         *(f"{result[f'overlap_{ratio}']:.3f}" for ratio in ratios), scores.cutoff,
                         f"{seconds:.0f} / {cpu:.0f}"])
            print("  " + " | ".join(str(c) for c in rows[-1][2:]), flush=True)
        results.append(entry)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    headers = ["scan", "bf16 additions", "mode vs fp32", "Spearman mean", "Spearman min", "rel. L2 mean",
               *(f"pruned overlap @{ratio}" for ratio in ratios), "cutoff", "wall / CPU s"]
    markdown = (
        f"Model {args.model}, data {args.data}; scores compared with the fp32 scan's (same seeds and data); "
        f"pruned overlap = share of the channels fp32's scores prune at that ratio that this mode's prune too. "
        f"Peak RSS {peak:.2f} GB.\n\n" + markdown_table(headers, rows)
    )
    name = f"{args.name}-quick" if args.quick else args.name
    path = write_results(name, {"model": args.model, "data": args.data, "ratios": ratios, "scans": results,
                                "peak_rss_gb": peak}, markdown, info)
    print(path)


if __name__ == "__main__":
    main()
