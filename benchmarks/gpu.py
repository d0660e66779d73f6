"""The whole Diff-Pruning job on one CUDA GPU: scan, prune, fine-tune, eval, compare — time and peak memory.

Usage: python benchmarks/gpu.py [--quick] [--device cuda] [--model config:ddpm-cifar10-32]

On the CIFAR-10 DDPM config (35.7 M params, random weights; nothing is downloaded) with builtin:digits as data
(shipped with dp, resized to 32 px, 3 channels), all on the GPU, through the library functions the commands call:

1. score: diff-taylor scans of --timesteps timesteps (threshold 0: every one, so all variants do the same work)
   at the reference's batch of 128 calibration images: the reference loop (one timestep per pass, --chunk 1),
   dp's default packing on a GPU, 8 timesteps per pass, and the default packing in bf16. Their losses and
   cutoffs are compared with the loop's.
2. prune: the packed fp32 scores, --target-macs 0.5 (tolerance 20 %: the CIFAR UNet's GroupNorm groups of 4
   channels make about 0.56 the closest reachable fraction; the achieved one is recorded).
3. finetune: --finetune-steps steps at batch 128 in bf16 (AdamW, EMA 0.99, no checkpoints but the last).
4. eval: the fine-tuned model, 128 samples (DDIM, 20 steps, batch 128), latency at batch 1 and 128.
5. compare: original against pruned, latency at batch 1 and 128 (8 samples, DDIM 10 steps).

Every step records its wall time and torch.cuda.max_memory_allocated (reset before the step).
--quick (under 5 minutes on one recent GPU, by estimate): 100 timesteps per scan, 100 fine-tune steps;
without it 1000 timesteps (the whole reference scan) and 1000 steps.
Writes benchmarks/results/gpu.{json,md} (quick: gpu-quick.*). Exits with code 2 and one line when there is no
CUDA GPU. --device cpu (with a small --model such as config:ddpm-digits) only checks that the script runs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, markdown_table, write_results  # noqa: E402

CALIB_IMAGES = 128  # the reference's calibration batch for CIFAR-10
DATA = "builtin:digits"


class Steps:
    """Runs named steps, each timed and with its peak GPU memory."""

    def __init__(self, device):
        self.device = device
        self.records: list[dict] = []

    def run(self, name: str, work, **facts):
        import torch

        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        print(f"{name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        result = work()
        if cuda:
            torch.cuda.synchronize(self.device)
        record = {
            "step": name,
            "seconds": time.perf_counter() - started,
            "peak_gpu_memory_mb": torch.cuda.max_memory_allocated(self.device) / 2**20 if cuda else None,
            **facts,
        }
        self.records.append(record)
        print(f"{name}: {record['seconds']:.1f} s", file=sys.stderr, flush=True)
        return result, record


def score_step(steps: Steps, args, dist, name: str, **options):
    from dpcli.jobs.score import ScoreSettings, compute_scores
    from dpcli.loading import load_model

    loaded = load_model(args.model)
    settings = ScoreSettings(
        "diff-taylor", data=DATA, threshold=0.0, calib_size=CALIB_IMAGES, timesteps=args.timesteps, **options
    )
    scores, record = steps.run(name, lambda: compute_scores(loaded, settings, dist=dist))
    scan = scores.scan
    record.update(
        chunk=scan.chunk,
        forward_passes=scan.forward_passes,
        samples=scan.samples_computed,
        samples_per_second=scan.samples_computed / scan.seconds,
        scan_seconds=scan.seconds,
        cutoff=scan.cutoff,
        precision=settings.precision,
    )
    return loaded, scores, record


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="config:ddpm-cifar10-32")
    parser.add_argument("--timesteps", type=int, default=None, help="per scan (default 100 quick, 1000 full)")
    parser.add_argument("--finetune-steps", type=int, default=None, help="(default 100 quick, 1000 full)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the result files")
    args = parser.parse_args()
    args.timesteps = args.timesteps or (100 if args.quick else 1000)
    args.finetune_steps = args.finetune_steps or (100 if args.quick else 1000)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "benchmarks/gpu.py needs a CUDA GPU and torch cannot see one here; nothing was run",
            file=sys.stderr,
        )
        return 2

    from dpcli.io.files import AtomicFolder
    from dpcli.jobs.compare import CompareSettings, compare_models
    from dpcli.jobs.evaluate import EvalSettings, sample_and_measure
    from dpcli.jobs.finetune.loop import save_finetuned, train
    from dpcli.jobs.finetune.settings import FinetuneSettings
    from dpcli.jobs.measure import LatencySettings
    from dpcli.jobs.prune import PruneSettings, prune_model, pruned_metadata
    from dpcli.loading import load_model
    from dpcli.pruning import PruneOptions
    from dpcli.reporting import Reporter
    from dpcli.runtime import Distributed, start_distributed
    from dpcli.sampling import SamplerSettings

    info = machine_info()
    dist: Distributed = start_distributed(args.device)
    device = dist.device
    steps = Steps(device)
    work = Path(tempfile.mkdtemp(prefix="dp-gpu-bench-"))

    # 1. score
    _, loop, loop_record = score_step(
        steps, args, dist, "score: reference loop (1 timestep per pass)", chunk=1
    )
    loaded, packed, _ = score_step(steps, args, dist, "score: packed (default --chunk)")
    _, eight, _ = score_step(
        steps, args, dist, "score: packed, 8 timesteps per pass", chunk=8, batch_size=8 * CALIB_IMAGES
    )
    _, low, _ = score_step(steps, args, dist, "score: packed, bf16", precision="bf16")
    scan_rows = []
    for record, scores in zip(steps.records, (loop, packed, eight, low), strict=True):
        difference = max(
            abs(a - b) / abs(b) for a, b in zip(scores.scan.losses, loop.scan.losses, strict=True)
        )
        record["max_relative_loss_difference_to_loop"] = difference
        record["speedup_over_loop"] = loop_record["scan_seconds"] / record["scan_seconds"]
        scan_rows.append(
            [
                record["step"],
                record["chunk"],
                record["forward_passes"],
                f"{record['scan_seconds']:.1f}",
                f"{record['samples_per_second']:.0f}",
                f"{record['speedup_over_loop']:.2f}x",
                _mb(record),
                f"{record['max_relative_loss_difference_to_loop']:.1e}",
            ]
        )

    # 2. prune
    settings = PruneSettings(target_macs=0.5, tolerance=0.2)
    report, record = steps.run(
        "prune: --target-macs 0.5", lambda: prune_model(loaded, packed, settings, PruneOptions())
    )
    record.update(
        macs_fraction=report.macs_fraction, params_after=report.params_after, trials=len(report.trials)
    )
    pruned = work / "pruned"
    with AtomicFolder(pruned) as folder:
        loaded.adapter.save(loaded, folder, pruned_metadata(report, packed, settings, PruneOptions()))

    # 3. finetune
    tuned = work / "tuned"
    tuning = FinetuneSettings(
        data=DATA,
        steps=args.finetune_steps,
        batch_size=CALIB_IMAGES,
        precision="bf16",
        ema_decay=0.99,
        checkpoint_every=0,
    )
    student = load_model(str(pruned))
    result, record = steps.run(
        f"finetune: {args.finetune_steps} steps, batch 128, bf16",
        lambda: train(student, None, tuning, tuned, dist=dist),
    )
    save_finetuned(student, result, tuned)
    record.update(
        steps_per_second=args.finetune_steps / record["seconds"],
        final_loss=result.report.to_json(output=tuned)["final_loss"],
    )

    # 4. eval, 5. compare
    latency = LatencySettings(batch=CALIB_IMAGES)
    evaluation = EvalSettings(
        num_samples=CALIB_IMAGES,
        latency_batch=CALIB_IMAGES,
        device=str(device),
        steps=20,
        batch_size=CALIB_IMAGES,
    )
    eval_report, record = steps.run(
        "eval: 128 samples, DDIM 20 steps",
        lambda: sample_and_measure(load_model(str(tuned)), evaluation, None, Reporter()).to_json(),
    )
    record.update(
        images_per_second=eval_report["sampling"]["images_per_second"], latency=eval_report["latency"]
    )
    comparison = CompareSettings(
        models=[args.model, str(pruned)],
        num_samples=8,
        latency=latency,
        device=str(device),
        sampling=SamplerSettings(steps=10, batch_size=8),
    )
    compared, record = steps.run(
        "compare: original vs pruned",
        lambda: compare_models(comparison, Reporter().progress, Reporter().status, False).to_json(),
    )
    models = compared["models"]
    record.update(
        models=[
            {
                k: m.get(k)
                for k in (
                    "model",
                    "macs",
                    "latency",
                    "speedup_batch_1",
                    "speedup_batch",
                    "speedup_per_macs_ratio_batch_1",
                    "speedup_per_macs_ratio_batch",
                )
            }
            for m in models
        ]
    )
    dist.close()

    rows = [[r["step"], f"{r['seconds']:.1f}", _mb(r)] for r in steps.records]
    latency_rows = [
        [
            Path(m["model"]).name,
            f"{m['macs'] / 1e9:.2f} G",
            f"{m['latency']['batch_1_ms']:.2f}",
            f"{m['latency']['batch_ms']:.2f}",
            _x(m.get("speedup_batch_1")),
            _x(m.get("speedup_batch")),
            _x(m.get("speedup_per_macs_ratio_batch")),
        ]
        for m in models
    ]
    prune_record = next(r for r in steps.records if r["step"].startswith("prune"))
    markdown = "\n".join(
        [
            f"`{args.model}`, data {DATA}, device {device}; scans of {args.timesteps} timesteps × {CALIB_IMAGES} images.",
            "",
            "## Every step",
            "",
            markdown_table(["step", "seconds", "peak GPU memory (MB)"], rows),
            "",
            "## Timestep scan",
            "",
            markdown_table(
                [
                    "scan",
                    "chunk",
                    "passes",
                    "scan s",
                    "samples/s",
                    "speedup",
                    "peak MB",
                    "max rel. loss diff. to loop",
                ],
                scan_rows,
            ),
            "",
            f"Pruned to {prune_record['macs_fraction']:.3f} of the MACs in {prune_record['trials']} search trials.",
            "",
            "## Latency (ms per denoising step)",
            "",
            markdown_table(
                [
                    "model",
                    "MACs",
                    "batch 1",
                    f"batch {CALIB_IMAGES}",
                    "speedup b1",
                    f"speedup b{CALIB_IMAGES}",
                    "speedup / MACs ratio",
                ],
                latency_rows,
            ),
        ]
    )
    name = "gpu-quick" if args.quick else "gpu"
    shutil.rmtree(work, ignore_errors=True)
    write_results(
        name,
        {"device": str(device), "timesteps": args.timesteps, "steps": steps.records},
        markdown,
        info,
        folder=args.results,
    )
    print(markdown)
    return 0


def _mb(record: dict) -> str:
    peak = record.get("peak_gpu_memory_mb")
    return f"{peak:.0f}" if peak is not None else "n/a"


def _x(value) -> str:
    return f"{value:.2f}x" if value is not None else "n/a"


if __name__ == "__main__":
    sys.exit(main())
