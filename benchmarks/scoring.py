"""Packed timestep scan vs the reference one-timestep-per-forward loop (same data, noise and cutoff).

Usage: python benchmarks/scoring.py [MODEL] [--calib 16] [--timesteps 64] [--threshold 0]
Prints seconds per run for chunk sizes 1 (the reference loop) and larger packings, and checks that the
cutoff and the accumulated gradients agree.
"""

import argparse
import time

import torch

from dpcli.loading import load_model
from dpcli.plugins import get_registry
from dpcli.scoring import accumulate_gradients, calibration_batch, calibration_noise


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="config:ddpm-digits")
    parser.add_argument("--data", default="builtin:digits")
    parser.add_argument("--calib", type=int, default=16)
    parser.add_argument("--timesteps", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=0.0)
    parser.add_argument("--chunks", default="1,2,4,8,16")
    args = parser.parse_args()

    loaded = load_model(args.model)
    adapter = get_registry().adapter(loaded.adapter)
    x0, _ = calibration_batch(loaded, adapter, args.data, args.calib, seed=0)
    noise = calibration_noise(x0, seed=0)
    reference_grads = None
    print(f"model {args.model}, calib {args.calib} images, {args.timesteps} timesteps, threshold {args.threshold}, "
          f"torch threads {torch.get_num_threads()}")
    for chunk in map(int, args.chunks.split(",")):
        started = time.perf_counter()
        scan = accumulate_gradients(loaded, adapter, x0, noise, args.threshold, timesteps=args.timesteps,
                                    chunk=chunk, batch_size=chunk * args.calib)
        seconds = time.perf_counter() - started
        grads = torch.cat([p.grad.flatten() for p in loaded.model.parameters()])
        if reference_grads is None:
            reference_grads, reference_cutoff, reference_seconds = grads, scan.cutoff, seconds
        error = ((grads - reference_grads).norm() / reference_grads.norm()).item()
        print(f"chunk {chunk:3d}: {seconds:7.2f} s, {scan.forward_passes:4d} passes, cutoff {scan.cutoff} "
              f"(reference {reference_cutoff}), relative grad difference {error:.1e}, "
              f"speedup {reference_seconds / seconds:.2f}x")


if __name__ == "__main__":
    main()
