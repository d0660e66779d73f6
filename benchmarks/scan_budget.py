"""What a timestep scan should spend its samples on: timestep stride or calibration images.

Usage: python benchmarks/scan_budget.py [--quick] [--model builtin:ddpm-digits] [--threshold 0.05] [--ratio 0.3]
                                        [--truth 256x1] [--settings 16x64,8x32,4x16,1x4,...] [--seeds 0,1,2]
                                        [--cifar-timesteps 32] [--threads 1]

Agreement: builtin:ddpm-digits is scored with diff-taylor on builtin:digits (threshold 0.05) and pruned at
--ratio 0.3 per setting "KxC" (--timestep-stride K, --calib-size C), through the library functions `dp score`
and `dp prune` call (compute_scores, prune_model: one process, no start-up per run). The kept channels
prune_model records (what dp prune writes to dpcli.json as pruning.kept_channels) are compared with those of
a "ground truth" scan with many calibration images (--truth, seed 100, images drawn independently of the
seeds 0, 1, 2 of the settings): agreement = mean over pruned modules of |kept ∩ kept_truth| / |kept_truth|.
Samples = forward samples the scan computed (calibration images × timesteps scanned, forward and backward);
seconds = the scan's own time. The settings come in compute levels (same samples); the script prints, for
each level, the best setting and what `--scan-budget` (dpcli.jobs.scan_budget.plan_scan) chooses for that budget.

Time only: the CIFAR-10 DDPM config (35.7 M params, random weights) scans --cifar-timesteps timesteps (threshold
0) at 4 images with strides 1, 4, 16: seconds per scan and per forward sample.

--quick: truth 128 images at stride 4, settings 16x64,8x32,4x16,1x4 and 16x16 (one compute level and a lower
one), seeds 0,1,2, CIFAR 8 timesteps (about 5 minutes on 2 shared cores).
Writes benchmarks/results/scan_budget.{json,md,png} (quick: scan_budget-quick.*).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, markdown_table, pyplot, write_results  # noqa: E402

FULL_SETTINGS = "16x64,8x32,4x16,1x4,32x128,16x256,8x128,4x64,16x32,16x16,1x32"
QUICK_SETTINGS = "16x64,8x32,4x16,1x4,16x16"


def parse_setting(text: str) -> tuple[int, int]:
    stride, calib = text.lower().split("x")
    return int(stride), int(calib)


def scan_and_prune(model: str, stride: int, calib: int, seed: int, args) -> dict:
    """Score with diff-taylor at (stride, calib, seed), prune at --ratio: the scan and the kept channels."""
    from dpcli.jobs.prune import PruneSettings, prune_model
    from dpcli.jobs.score import ScoreSettings, compute_scores
    from dpcli.loading import load_model
    from dpcli.pruning import PruneOptions

    loaded = load_model(model)
    settings = ScoreSettings("diff-taylor", data="builtin:digits", threshold=args.threshold, calib_size=calib,
                             seed=seed, timestep_stride=stride)
    scores = compute_scores(loaded, settings)
    report = prune_model(loaded, scores, PruneSettings(ratio=args.ratio), PruneOptions(), seed=seed)
    scan = scores.scan
    return {"stride": stride, "calib_size": calib, "seed": seed, "cutoff": scan.cutoff, "samples": scan.samples_computed,
            "forward_passes": scan.forward_passes, "scan_seconds": scan.seconds, "kept": report.kept_channels}


def agreement(kept: dict, truth: dict) -> float:
    """Mean over the modules whose output channels the truth pruned of the share of kept channels in common."""
    shares = []
    for module, sides in truth.items():
        if "out" in sides:
            reference = set(sides["out"])
            shares.append(len(reference & set(kept.get(module, {}).get("out", []))) / len(reference))
    return statistics.fmean(shares)


def cifar_times(args) -> list[dict]:
    """Scan time of the CIFAR-10 config (random weights) at strides 1, 4, 16: threshold 0, 4 images."""
    import torch

    from dpcli.loading import load_model
    from dpcli.scoring import accumulate_gradients

    loaded = load_model("config:ddpm-cifar10-32")
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 32, 32, generator=generator) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator)
    rows = []
    for stride in (1, 4, 16):
        scan = accumulate_gradients(loaded, loaded.adapter, x0, noise, 0.0, timesteps=args.cifar_timesteps,
                                    chunk=16, batch_size=64, stride=stride)
        rows.append({"stride": stride, "timesteps_scanned": len(scan.losses), "samples": scan.samples_computed,
                     "forward_passes": scan.forward_passes, "scan_seconds": scan.seconds,
                     "ms_per_sample": 1000 * scan.seconds / scan.samples_computed})
        print(f"cifar10 config, stride {stride:2d}: {len(scan.losses)} timesteps, {scan.samples_computed} samples, "
              f"{scan.seconds:.1f} s", flush=True)
        loaded.model.zero_grad(set_to_none=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="builtin:ddpm-digits")
    parser.add_argument("--threshold", type=float, default=0.05)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--truth", default="1x256", help="STRIDExCALIB of the ground-truth scan (seed 100)")
    parser.add_argument("--settings", default=FULL_SETTINGS, help="comma-separated STRIDExCALIB")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cifar-timesteps", type=int, default=32, help="0 skips the CIFAR-10 timing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    if args.quick:
        args.truth, args.settings, args.cifar_timesteps = "4x128", QUICK_SETTINGS, 8
    import torch

    from dpcli.jobs.scan_budget import plan_scan

    torch.set_num_threads(args.threads)
    info = machine_info()
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    truth_stride, truth_calib = parse_setting(args.truth)
    truth = scan_and_prune(args.model, truth_stride, truth_calib, 100, args)
    print(f"truth {args.truth}: cutoff {truth['cutoff']}, {truth['samples']} samples, {truth['scan_seconds']:.1f} s",
          flush=True)
    results = []
    for text in args.settings.split(","):
        stride, calib = parse_setting(text)
        runs = [scan_and_prune(args.model, stride, calib, seed, args) for seed in seeds]
        for run in runs:
            run["agreement"] = agreement(run.pop("kept"), truth["kept"])
        scores = [run["agreement"] for run in runs]
        result = {
            "setting": text, "stride": stride, "calib_size": calib, "runs": runs,
            "agreement_mean": statistics.fmean(scores),
            "agreement_sd": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "samples_mean": statistics.fmean(run["samples"] for run in runs),
            "seconds_mean": statistics.fmean(run["scan_seconds"] for run in runs),
            "cutoffs": [run["cutoff"] for run in runs],
        }
        results.append(result)
        print(f"{text:>7}: agreement {result['agreement_mean']:.3f} ± {result['agreement_sd']:.3f}, "
              f"{result['samples_mean']:.0f} samples, {result['seconds_mean']:.2f} s, cutoffs {result['cutoffs']}",
              flush=True)
    cutoff = round(statistics.fmean(c for r in results for c in r["cutoffs"]))
    # compute levels: settings whose planned cost (calib × (cutoff // stride + 1)) is within 25 % of each other
    levels: list[list[dict]] = []
    for result in sorted(results, key=lambda r: r["calib_size"] * (cutoff // r["stride"] + 1)):
        cost = result["calib_size"] * (cutoff // result["stride"] + 1)
        result["planned_samples"] = cost
        if levels and cost <= 1.25 * levels[-1][0]["planned_samples"]:
            levels[-1].append(result)
        else:
            levels.append([result])
    level_rows = []
    for level in levels:
        best = max(level, key=lambda r: r["agreement_mean"])
        budget = max(r["planned_samples"] for r in level)
        try:
            plan = plan_scan(budget, cutoff, available=1797)
            chose = f"{plan.timestep_stride}x{plan.calib_size}"
        except Exception as error:  # a budget below the rule's minimum
            chose = f"({error})"
        level_rows.append([f"{budget:,}", ", ".join(f"{r['setting']} {r['agreement_mean']:.3f}" for r in level),
                           best["setting"], chose])
    rows = [[r["setting"], r["stride"], r["calib_size"], f"{r['samples_mean']:.0f}", f"{r['seconds_mean']:.2f}",
             f"{r['agreement_mean']:.3f} ± {r['agreement_sd']:.3f}", " ".join(str(c) for c in r["cutoffs"])]
            for r in sorted(results, key=lambda r: r["planned_samples"])]
    cifar = cifar_times(args) if args.cifar_timesteps else []
    markdown = (
        f"{args.model}, diff-taylor on builtin:digits, threshold {args.threshold:g}, ratio {args.ratio:g}; ground "
        f"truth {args.truth} (stride x calibration images, seed 100): cutoff {truth['cutoff']}, {truth['samples']:,} "
        f"samples, {truth['scan_seconds']:.1f} s. Agreement = mean over pruned modules of the share of kept output "
        f"channels in common with the truth; mean ± sd over seeds {args.seeds}; {args.threads} torch thread(s).\n\n"
        + markdown_table(["stride x images", "stride", "images", "samples", "scan s", "agreement", "cutoffs"], rows)
        + "\n\nAt (about) equal compute:\n\n"
        + markdown_table(["samples", "settings (agreement)", "best", "--scan-budget chooses"], level_rows)
        + "\n"
    )
    if cifar:
        markdown += (
            f"\nCIFAR-10 DDPM config (random weights, time only): {args.cifar_timesteps} timesteps, threshold 0, 4 "
            "images, 16 timesteps per pass.\n\n"
            + markdown_table(["stride", "timesteps scanned", "samples", "scan s", "ms per sample"],
                             [[c["stride"], c["timesteps_scanned"], c["samples"], f"{c['scan_seconds']:.1f}",
                               f"{c['ms_per_sample']:.0f}"] for c in cifar])
            + "\n"
        )
    markdown += f"\nTotal benchmark time: {time.perf_counter() - started:.0f} s.\n"
    print(markdown)
    name = "scan_budget-quick" if args.quick else "scan_budget"
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for stride in sorted({r["stride"] for r in results}):
        chosen = sorted((r for r in results if r["stride"] == stride), key=lambda r: r["samples_mean"])
        ax.errorbar([r["samples_mean"] for r in chosen], [r["agreement_mean"] for r in chosen],
                    yerr=[r["agreement_sd"] for r in chosen], marker="o", capsize=3, label=f"stride {stride}")
    ax.set_xscale("log")
    ax.set_xlabel("forward samples of the scan")
    ax.set_ylabel(f"kept-channel agreement with {args.truth}")
    ax.set_title(f"{args.model}: stride vs calibration images")
    ax.legend()
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    truth.pop("kept")
    write_results(name, {"settings": vars(args), "truth": truth, "results": results, "estimated_cutoff": cutoff,
                         "levels": level_rows, "cifar10": cifar}, markdown, info)


if __name__ == "__main__":
    main()
