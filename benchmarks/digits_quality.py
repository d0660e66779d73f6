"""FID and SSIM of the built-in digits DDPM: original vs pruned vs pruned + fine-tuned (the paper's table,
in miniature).

Usage: PYTHONPATH=. python benchmarks/digits_quality.py [--out digits-quality] [--num-samples 256]
       [--steps 100] [--finetune-steps 300] [--seed 0]

Runs the dp commands of ``make demo``: ``dp score builtin:ddpm-digits --criterion diff-taylor``,
``dp prune --target-macs 0.56``, ``dp finetune`` for 300 steps (10 % of the model's training), then
``dp eval`` of each model with ``--data builtin:digits`` (FID with the shipped digits feature network)
and ``--reference builtin:ddpm-digits`` (SSIM/PSNR from the same noise; DDIM, uniform spacing), and
prints a Markdown table (latency: see benchmarks/sampling.py). benchmarks/digits_quality.md records a run.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path


def dp(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "dpcli", *args], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("digits-quality"))
    parser.add_argument("--num-samples", default="256")
    parser.add_argument("--steps", default="100")
    parser.add_argument("--finetune-steps", default="300")
    parser.add_argument("--seed", default="0")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    dp("score", "builtin:ddpm-digits", "--criterion", "diff-taylor", "--data", "builtin:digits",
       "--seed", args.seed, "-o", str(out / "scores.safetensors"))  # fmt: skip
    dp("prune", "builtin:ddpm-digits", "--scores", str(out / "scores.safetensors"), "--target-macs", "0.56",
       "--yes", "--force", "-o", str(out / "pruned"))  # fmt: skip
    dp("finetune", str(out / "pruned"), "--data", "builtin:digits", "--steps", args.finetune_steps,
       "--batch-size", "64", "--lr", "2e-4", "--warmup", "30", "--ema-decay", "0.99", "--seed", args.seed,
       "--force", "-o", str(out / "finetuned"))  # fmt: skip
    common = [
        "--data",
        "builtin:digits",
        "--num-samples",
        args.num_samples,
        "--steps",
        args.steps,
        "--no-latency",
    ]
    common += ["--seed", args.seed, "--force"]
    models = {
        "original": "builtin:ddpm-digits",
        "pruned": str(out / "pruned"),
        "fine-tuned": str(out / "finetuned"),
    }
    reports = {}
    for name, model in models.items():
        reference = [] if name == "original" else ["--reference", "builtin:ddpm-digits"]
        dp("eval", model, *common, *reference, "-o", str(out / f"eval-{name}"))
        reports[name] = json.loads((out / f"eval-{name}" / "report.json").read_text())
    first = reports["original"]
    print(
        f"DDIM {args.steps} steps, {args.num_samples} samples, seed {args.seed}; "
        "FID: digits features vs builtin:digits"
    )
    print("| model | params | MACs | FID | SSIM to original | PSNR to original |")
    print("|---|---|---|---|---|---|")
    for name, report in reports.items():
        ssim = "1 (itself)" if report["ssim"] is None else f"{report['ssim']:.3f}"
        psnr = "∞" if report["psnr"] is None else f"{report['psnr']:.2f} dB"
        print(
            f"| {name} | {report['params'] / 1e6:.3f} M | {report['macs'] / 1e6:.1f} M "
            f"({report['macs'] / first['macs']:.1%}) | {report['fid']:.2f} | {ssim} | {psnr} |"
        )


if __name__ == "__main__":
    main()
