"""Our sampler vs diffusers' DDIMPipeline: images/s on the same model, steps, batch and noise.

Usage: python benchmarks/sampling.py [--quick] [--models config:ddpm-cifar10-32,pruned] [--steps 10]
                                     [--batch 16] [--runs 5] [--threads 1]

For each model: dpcli's sampler (`Sampler` + `generate`, what `dp eval` runs) and diffusers' `DDIMPipeline`
(eta 0, the same scheduler, `num_inference_steps` = --steps), the same batch and the same per-image noise
(`sample_generator(seed 0, index i)`), so the two must give the same images: the largest pixel difference
is reported (one 8-bit level = 3.9e-3, dpcli rounds its images to 8 bits). One warm-up run each, then
--runs rounds alternating the two (both see the same machine load), median seconds -> images/s.
`pruned` in --models means the first model pruned with `dp prune --criterion magnitude --target-macs 0.56`.

--quick: builtin:ddpm-digits only, 10 steps, batch 16, 3 runs. Writes benchmarks/results/sampling.{json,md,png}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import DP, RESULTS, machine_info, markdown_table, pyplot, write_results  # noqa: E402
from diffusers import DDIMPipeline  # noqa: E402

# The library entry points this benchmark times (the only dpcli imports; all in one place).
from dpcli.loading import load_model  # noqa: E402
from dpcli.sampling import Sampler, SamplerSettings, generate, sample_generator  # noqa: E402


def alternating(functions: dict, runs: int, warmup: int = 1) -> dict:
    """All seconds per function: ``warmup`` untimed calls each, then ``runs`` rounds calling each once."""
    for function in functions.values():
        for _ in range(warmup):
            function()
    times = {name: [] for name in functions}
    for _ in range(runs):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - started)
    return times


def compare_samplers(loaded, steps: int, batch: int, runs: int) -> dict:
    sampler = Sampler(loaded, SamplerSettings(steps=steps, batch_size=batch, precision="fp32"), device="cpu")
    pipeline = DDIMPipeline(unet=loaded.model, scheduler=loaded.scheduler)
    pipeline.set_progress_bar_config(disable=True)

    def run_pipeline():
        generators = [sample_generator(0, i, 0) for i in range(batch)]
        return pipeline(batch_size=batch, generator=generators, num_inference_steps=steps, output_type="np")

    times = alternating({"dpcli": lambda: generate(sampler, batch), "diffusers": run_pipeline}, runs=runs)
    ours = generate(sampler, batch).images.float() / 255
    theirs = torch.from_numpy(run_pipeline().images).permute(0, 3, 1, 2)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "dpcli_images_per_second": batch / medians["dpcli"],
        "diffusers_images_per_second": batch / medians["diffusers"],
        "ratio": medians["diffusers"] / medians["dpcli"],
        "seconds_all": times,
        "max_image_difference": float((ours - theirs).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default="config:ddpm-cifar10-32,pruned")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.models, args.runs = "builtin:ddpm-digits", 3
    torch.set_num_threads(args.threads)
    info = machine_info()
    results, rows = {}, []
    with tempfile.TemporaryDirectory() as folder:
        specs = [m.strip() for m in args.models.split(",")]
        for spec in specs:
            source = spec
            if spec == "pruned":
                source = str(Path(folder) / "pruned")
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                subprocess.run([str(DP), "prune", specs[0], "--criterion", "magnitude", "--target-macs", "0.56",
                                "--yes", "-o", source], check=True, capture_output=True, env=env)
                spec = f"{specs[0]} pruned to 56 % MACs"
            result = compare_samplers(load_model(source), args.steps, args.batch, args.runs)
            results[spec] = result
            rows.append([spec, f"{result['dpcli_images_per_second']:.3f}", f"{result['diffusers_images_per_second']:.3f}",
                         f"{result['ratio']:.2f}", f"{result['max_image_difference']:.1e}"])
            print(rows[-1], flush=True)
    markdown = (
        f"DDIM (eta 0) {args.steps} steps, batch {args.batch}, fp32 CPU, {args.threads} thread(s); images/s from the "
        f"median of {args.runs} alternating runs after one warm-up each.\n\n"
        + markdown_table(["model", "dpcli sampler images/s", "diffusers DDIMPipeline images/s",
                          "dpcli / diffusers", "max pixel difference"], rows) + "\n"
    )
    print(markdown)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(results)
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [results[n]["dpcli_images_per_second"] for n in names], width=0.4, label="dpcli")
    ax.bar([i + 0.2 for i in x], [results[n]["diffusers_images_per_second"] for n in names], width=0.4,
           label="diffusers DDIMPipeline")
    ax.set_xticks(list(x), names, fontsize=7)
    ax.set_ylabel("images/s")
    ax.legend()
    ax.set_title(f"DDIM {args.steps} steps, batch {args.batch}")
    fig.tight_layout()
    name = "sampling-quick" if args.quick else "sampling"
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    write_results(name, {"settings": vars(args), "results": results}, markdown, info)


if __name__ == "__main__":
    main()
