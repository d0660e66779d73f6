"""Fine-tuning throughput on the CPU: steps/s of `dp finetune` on the digits model and the CIFAR-10 config,
and torchrun/DDP (gloo) with 2 processes against 1 process at the same global batch; with --validation, the
cost of one `--validate-every` validation (sampling, grid, small-sample FID) on builtin:ddpm-digits at the
default --validation-samples, and how noisy a small-sample FID is (its spread over sampling seeds).

Usage: python benchmarks/finetune.py [--steps 20] [--skip-ddp] [--skip-cifar] [--validation] [--only-validation]
Steps/s is measured from the progress callback, the first 2 steps (warm-up) excluded; the DDP comparison
runs the real command (`python -m torch.distributed.run --nproc-per-node 2 -m dpcli finetune ...`) and
reads steps/s from its --json report (whole loop, final checkpoint included, for both runs alike).
Results recorded on the development machine are at the end of this file.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dpcli.jobs.finetune.loop import FinetuneSettings, open_training_data, train
from dpcli.loading import load_model


def steps_per_second(model: str, batch: int, steps: int) -> float:
    loaded = load_model(model)
    stamps = []
    settings = FinetuneSettings(data="builtin:digits", steps=steps, batch_size=batch, checkpoint_every=0)
    source = open_training_data(loaded, settings)
    with tempfile.TemporaryDirectory() as folder:
        train(loaded, source, settings, Path(folder), on_step=lambda info: stamps.append(time.perf_counter()))
    return (len(stamps) - 2) / (stamps[-1] - stamps[1])  # steps 3..N; checkpoints are written after the stamp


def command_steps_per_second(processes: int, batch: int, steps: int, threads: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        args = ["config:ddpm-digits", "--data", "builtin:digits", "--steps", str(steps), "--batch-size",
                str(batch), "--checkpoint-every", "0", "-o", str(Path(folder) / "out"), "--json"]
        if processes > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                        str(processes), "-m", "dpcli", "finetune"]
        else:
            launcher = [sys.executable, "-m", "dpcli", "finetune"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run([*launcher, *args], capture_output=True, text=True, env=env, check=True)
        return json.loads(proc.stdout)["steps_per_second"]


def validation_cost(samples: int, repeats: int) -> dict:
    """Wall and CPU seconds of one validation of builtin:ddpm-digits (EMA = the shipped weights) on
    builtin:digits: the first one (which also computes the FID reference statistics) and the median of the
    next ``repeats``."""
    import statistics

    from dpcli.jobs.finetune.monitor import Validator

    loaded = load_model("builtin:ddpm-digits")
    settings = FinetuneSettings(
        data="builtin:digits", steps=1, batch_size=64, validate_every=1, validation_samples=samples
    )
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "validation").mkdir()
        validator = Validator(loaded, settings, Path(folder))
        started, cpu = time.perf_counter(), time.process_time()
        first, _ = validator.run(loaded.model, 1)
        first_wall, first_cpu = time.perf_counter() - started, time.process_time() - cpu
        runs = [validator.run(loaded.model, step)[0] for step in range(2, 2 + repeats)]
    return {
        "first_wall": first_wall,
        "first_cpu": first_cpu,
        "wall": statistics.median(r["seconds"] for r in runs),
        "cpu": statistics.median(r["cpu_seconds"] for r in runs),
        "fid": first["fid"],
    }


def fid_spread(samples: int, seeds: int) -> tuple[float, float, list[float]]:
    """Mean and standard deviation of the validation FID of builtin:ddpm-digits over sampling seeds."""
    import statistics

    from dpcli.jobs.finetune.monitor import Validator

    loaded = load_model("builtin:ddpm-digits")
    values, reference = [], None
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "validation").mkdir()
        for seed in range(seeds):
            settings = FinetuneSettings(
                data="builtin:digits",
                steps=1,
                batch_size=64,
                seed=seed,
                validate_every=1,
                validation_samples=samples,
            )
            validator = Validator(loaded, settings, Path(folder))
            validator.scores = reference  # the reference statistics do not depend on the seed
            values.append(validator.run(loaded.model, 1)[0]["fid"])
            reference = validator.scores
    return statistics.mean(values), statistics.stdev(values), values


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip-ddp", action="store_true")
    parser.add_argument("--skip-cifar", action="store_true")
    parser.add_argument("--validation", action="store_true", help="also time validation and FID noise")
    parser.add_argument("--only-validation", action="store_true")
    parser.add_argument("--seeds", type=int, default=5, help="sampling seeds for the FID spread")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    if args.validation or args.only_validation:
        from dpcli.jobs.finetune.settings import FinetuneSettings as Defaults

        default = Defaults(data="builtin:digits", steps=1).validation_samples
        cost = validation_cost(default, repeats=3)
        print(f"validation of builtin:ddpm-digits, K={default} (DDIM 50 steps, batch 64, FID on digits features): "
              f"{cost['wall']:.2f} s wall, {cost['cpu']:.2f} s CPU per validation; the first "
              f"{cost['first_wall']:.2f} s wall, {cost['first_cpu']:.2f} s CPU (with the reference statistics)")
        for samples, seeds in ((default, args.seeds), (64, args.seeds), (256, min(args.seeds, 3))):
            mean, std, values = fid_spread(samples, seeds)
            print(f"validation FID at K={samples} over {seeds} seeds: mean {mean:.2f}, std {std:.2f} "
                  f"(min {min(values):.2f}, max {max(values):.2f})")
        print(f"load average {os.getloadavg()[0]:.1f}")
        if args.only_validation:
            return
    for model, batch in (("config:ddpm-digits", 64), ("config:ddpm-digits", 16), ("config:ddpm-cifar10-32", 16)):
        if args.skip_cifar and "cifar" in model:
            continue
        rate = steps_per_second(model, batch, args.steps)
        print(f"{model} batch {batch}: {rate:.2f} steps/s ({rate * batch:.0f} images/s)")
    if not args.skip_ddp:
        global_batch = 32
        rates = {}
        for processes, threads in ((1, 1), (1, 2), (2, 1)):
            batch = global_batch // processes
            rates[processes, threads] = command_steps_per_second(processes, batch, args.steps, threads)
            print(f"digits, global batch {global_batch}: {processes} process(es) x {threads} thread(s): "
                  f"{rates[processes, threads]:.2f} steps/s")
        print(f"2 processes (gloo) vs 1 process x 1 thread: {rates[2, 1] / rates[1, 1]:.2f}x, "
              f"vs 1 process x 2 threads: {rates[2, 1] / rates[1, 2]:.2f}x")


if __name__ == "__main__":
    main()

# Recorded 2026-11-26 on the development machine: 2 CPU cores shared with other jobs (load average 4.7-5.0
# during the run, so these are lower bounds), torch 2.15 CPU, OMP_NUM_THREADS=1,
# `python benchmarks/finetune.py --steps 20`:
#
#   config:ddpm-digits batch 64: 1.82 steps/s (117 images/s)
#   config:ddpm-digits batch 16: 5.48 steps/s (88 images/s)
#   config:ddpm-cifar10-32 batch 16: 0.12 steps/s (2 images/s)
#   digits, global batch 32: 1 process(es) x 1 thread(s): 2.59 steps/s
#   digits, global batch 32: 1 process(es) x 2 thread(s): 0.38 steps/s
#   digits, global batch 32: 2 process(es) x 1 thread(s): 2.59 steps/s
#   2 processes (gloo) vs 1 process x 1 thread: 1.00x, vs 1 process x 2 threads: 6.83x
#
# On a loaded machine two threads per process spin against the other jobs (7x slower than one thread), and
# two single-thread processes gain nothing over one because the second core is busy elsewhere. The built-in
# model's own training (3000 steps, batch 64, 1 thread, same machine) averaged 0.95 steps/s.
#
# Recorded 2026-12-07, same machine shared with seven other sessions (load average 17.5 -> 17.7), torch 2.14.1,
# OMP_NUM_THREADS=1, `python benchmarks/finetune.py --only-validation --seeds 5` (15 min 53 s wall, 131.7 s CPU):
#
#   validation of builtin:ddpm-digits, K=16 (DDIM 50 steps, batch 64, FID on digits features): 17.27 s wall,
#     2.14 s CPU per validation; the first 16.37 s wall, 2.71 s CPU (with the reference statistics)
#   validation FID at K=16 over 5 seeds: mean 94.38, std 29.31 (min 67.88, max 132.88)
#   validation FID at K=64 over 5 seeds: mean 30.76, std 3.58 (min 27.38, max 34.70)
#   validation FID at K=256 over 3 seeds: mean 22.50, std 7.02 (min 16.00, max 29.95)
