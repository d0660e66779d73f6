"""The CIFAR-10 DDPM config (random weights): ratio -> achieved size table, --target-macs 0.56, CPU latency.

Usage: python benchmarks/cifar_prune.py [--ratios 0.1,0.2,...] [--repeats 10]
The criterion does not change sizes (magnitude is used: no data needed); latency is the median forward
time at batch 1 and 16 under torch.inference_mode, warm-up excluded.
"""

import argparse
import copy
import statistics
import time

import torch

from dpcli.jobs.prune import PruneSettings, measure, prune_model
from dpcli.jobs.score import ScoreSettings, compute_scores
from dpcli.loading import load_model
from dpcli.pruning import PruneOptions


def latency_ms(loaded, batch, repeats):
    adapter = loaded.adapter_object
    sample, timesteps = adapter.example_inputs(loaded, batch_size=batch)
    times = []
    with torch.inference_mode():
        for index in range(repeats + 2):
            started = time.perf_counter()
            adapter.predict(loaded, sample, timesteps)
            if index >= 2:
                times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", default="0.1,0.2,0.25,0.3,0.4,0.5")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    base = load_model("config:ddpm-cifar10-32")
    params0, macs0 = measure(base)
    scores = compute_scores(base, ScoreSettings("magnitude"))
    print(f"torch threads {torch.get_num_threads()}; original {params0:,} params, {macs0 / 1e9:.3f} GMAC")
    print("| ratio | params | MACs | MACs kept |")
    print("|---|---|---|---|")
    for ratio in map(float, args.ratios.split(",")):
        candidate = copy.copy(base)
        candidate.model = copy.deepcopy(base.model)
        report = prune_model(candidate, scores, PruneSettings(ratio=ratio), PruneOptions()).to_json()
        print(f"| {ratio} | {report['params_after'] / 1e6:.2f} M | {report['macs_after'] / 1e9:.3f} G "
              f"| {report['macs_fraction']:.1%} |")
    pruned = copy.copy(base)
    pruned.model = copy.deepcopy(base.model)
    report = prune_model(pruned, scores, PruneSettings(target_macs=0.56), PruneOptions()).to_json()
    print(f"--target-macs 0.56: ratio {report['ratio']:.4f}, {report['params_after']:,} params "
          f"({report['params_fraction']:.1%}), {report['macs_after'] / 1e9:.3f} GMAC ({report['macs_fraction']:.1%})")
    for batch in (1, 16):
        before = latency_ms(base, batch, args.repeats)
        after = latency_ms(pruned, batch, args.repeats)
        speedup = before / after
        print(f"batch {batch:2d}: {before:.1f} ms -> {after:.1f} ms per forward, speedup {speedup:.2f}x, "
              f"speedup/MACs-ratio {speedup * report['macs_fraction']:.2f}")


if __name__ == "__main__":
    main()
