"""Is the pruned CIFAR-10 DDPM really faster, and is our sampler as fast as diffusers' DDIMPipeline?

Usage: PYTHONPATH=. python benchmarks/sampling.py [--threads 1] [--repeats 5] [--batch 64] [--steps 10]
                                                   [--pipeline-batch 16] [--sampler-runs 5]

1. Prunes the CIFAR-10 DDPM config (random weights; timing does not depend on them) with
   ``dp prune config:ddpm-cifar10-32 --criterion magnitude --target-macs 0.56``.
2. Latency of one denoising step (model + DDIM update, the figure dp eval reports) at batch 1 and at
   ``--batch``, original and pruned: 2 warm-up steps, then ``--repeats`` timed steps, the two models
   alternating so that both see the same machine load; medians. Speedup and speedup / MACs-ratio
   (1.0 = the pruned model is as much faster as its MACs say).
3. Images/s of the full sampler: dpcli's ``generate`` against diffusers' ``DDIMPipeline`` on the same
   model, the same ``--steps`` and batch, the same per-image noise (the images are checked to match);
   one warm-up run each, then ``--sampler-runs`` alternating runs each (default 5), medians.

On a CPU shared with other jobs, more threads than free cores make timings erratic (OpenMP threads wait
on each other): ``--threads 1`` (the default) gives stable figures there. Results are printed as
Markdown; benchmarks/sampling.md records a run.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dpcli.jobs.evaluate import model_summary
from dpcli.loading import load_model
from dpcli.sampling import Sampler, SamplerSettings, generate, sample_generator


def prune_cifar(folder: Path) -> Path:
    out = folder / "cifar-pruned"
    command = [sys.executable, "-m", "dpcli", "prune", "config:ddpm-cifar10-32", "--criterion", "magnitude"]
    subprocess.run([*command, "--target-macs", "0.56", "-o", str(out)], check=True, capture_output=True)
    return out


def alternating(functions: dict, runs: int, warmup: int = 1) -> dict:
    """Median seconds per function: ``warmup`` untimed calls each, then ``runs`` rounds calling each once."""
    for function in functions.values():
        for _ in range(warmup):
            function()
    times = {name: [] for name in functions}
    for _ in range(runs):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def step_latencies(samplers: dict, batch: int, repeats: int) -> dict:
    """ms per denoising step at ``batch``, the models alternating."""
    calls = {
        name: (lambda s=sampler: s.step_latency(batch, warmup=0, repeats=1))
        for name, sampler in samplers.items()
    }
    return {name: 1000 * seconds for name, seconds in alternating(calls, repeats, warmup=2).items()}


def sampler_images_per_second(loaded, steps: int, batch: int, runs: int) -> tuple[float, float, torch.Tensor]:
    from diffusers import DDIMPipeline

    sampler = Sampler(loaded, SamplerSettings(steps=steps, batch_size=batch, precision="fp32"), device="cpu")
    pipeline = DDIMPipeline(unet=loaded.model, scheduler=loaded.scheduler)
    pipeline.set_progress_bar_config(disable=True)

    def run_pipeline():
        generators = [sample_generator(0, i, 0) for i in range(batch)]
        return pipeline(batch_size=batch, generator=generators, num_inference_steps=steps, output_type="np")

    seconds = alternating({"ours": lambda: generate(sampler, batch), "diffusers": run_pipeline}, runs=runs)
    ours_images = generate(sampler, batch).images.float() / 255
    theirs_images = torch.from_numpy(run_pipeline().images).permute(0, 3, 1, 2)
    difference = (ours_images - theirs_images).abs().max()
    return batch / seconds["ours"], batch / seconds["diffusers"], difference


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--pipeline-batch", type=int, default=16)
    parser.add_argument("--sampler-runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, fp32")
    with tempfile.TemporaryDirectory() as folder:
        pruned_folder = prune_cifar(Path(folder))
        models = {"original": load_model("config:ddpm-cifar10-32"), "pruned": load_model(str(pruned_folder))}
        summaries = {name: model_summary(loaded) for name, loaded in models.items()}
        samplers = {
            name: Sampler(loaded, SamplerSettings(precision="fp32"), device="cpu")
            for name, loaded in models.items()
        }
        by_batch = {batch: step_latencies(samplers, batch, args.repeats) for batch in (1, args.batch)}
        latency = {name: {batch: by_batch[batch][name] for batch in by_batch} for name in models}
        macs_fraction = summaries["pruned"]["macs"] / summaries["original"]["macs"]
        macs_ratio = 1 / macs_fraction
        print()
        print("| model | params | MACs | ms/step batch 1 | ms/step batch", args.batch, "|")
        print("|---|---|---|---|---|")
        for name, summary in summaries.items():
            print(
                f"| {name} | {summary['params'] / 1e6:.2f} M | {summary['macs'] / 1e9:.3f} G "
                f"| {latency[name][1]:.1f} | {latency[name][args.batch]:.0f} |"
            )
        print(f"\nMACs kept {macs_fraction:.1%} (MACs ratio {macs_ratio:.2f}x)")
        for batch in (1, args.batch):
            speedup = latency["original"][batch] / latency["pruned"][batch]
            print(f"batch {batch}: speedup {speedup:.2f}x, speedup / MACs ratio {speedup / macs_ratio:.2f}")
        print(
            f"\nFull sampler, DDIM {args.steps} steps, batch {args.pipeline_batch} (images/s, median of {args.sampler_runs}):"
        )
        print("| model | dpcli generate | diffusers DDIMPipeline | ratio | max image difference |")
        print("|---|---|---|---|---|")
        for name, loaded in models.items():
            ours, theirs, difference = sampler_images_per_second(
                loaded, args.steps, args.pipeline_batch, args.sampler_runs
            )
            print(f"| {name} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.2f} | {difference:.1e} |")


if __name__ == "__main__":
    main()
