"""Is the pruned model faster outside PyTorch too? Original vs pruned UNet under onnxruntime on the CPU.

Usage: python benchmarks/export.py [--quick] [--model config:ddpm-cifar10-32] [--targets 0.56,0.3]
                                   [--batches 1,16] [--repeats 10] [--threads 1]

For each target: ``dpcli.prune(model, criterion="magnitude", target_macs=T, tolerance=1)`` (magnitude needs
no data; --tolerance 1 keeps the closest reachable size), then ``Model.export`` to ONNX (opset 17, verified
by dp against PyTorch), then one onnxruntime CPU session per model (``intra_op_num_threads`` = --threads,
graph optimisations on) timed at each batch: 2 warm-up runs, then the median of --repeats runs of one UNet
forward on fixed random inputs. PyTorch eager (same threads, inference mode) is timed beside it.
Reported: params, MACs (fraction kept), ms per forward, speedup and speedup / MACs-ratio (1.0 = as much
faster as the MACs say). Random weights: timing does not depend on them.

--quick: target 0.56 only, 3 repeats. Writes benchmarks/results/export[-quick].{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import machine_info, markdown_table, write_results  # noqa: E402

WARMUP = 2


def median_ms(run, repeats: int) -> float:
    for _ in range(WARMUP):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def time_model(model, onnx_file: Path, batches: list[int], repeats: int, threads: int) -> dict:
    import onnxruntime
    import torch

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    shape = model.module.config.in_channels, model.module.config.sample_size, model.module.config.sample_size
    timings = {}
    for batch in batches:
        generator = torch.Generator().manual_seed(batch)
        sample = torch.randn(batch, *shape, generator=generator)
        timestep = torch.randint(0, 1000, (batch,), generator=generator)
        feeds = {"sample": sample.numpy(), "timestep": timestep.numpy()}
        onnx_ms = median_ms(lambda feeds=feeds: session.run(None, feeds), repeats)
        with torch.inference_mode():
            torch_ms = median_ms(lambda s=sample, t=timestep: model.module(s, t), repeats)
        timings[batch] = {"onnxruntime_ms": onnx_ms, "torch_ms": torch_ms}
        print(f"  batch {batch}: onnxruntime {onnx_ms:.1f} ms, torch {torch_ms:.1f} ms", flush=True)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="config:ddpm-cifar10-32")
    parser.add_argument("--targets", default="0.56,0.3")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.targets, args.repeats = "0.56", 3
    import torch

    import dpcli

    torch.set_num_threads(args.threads)
    info = machine_info()
    info["torch_threads"] = args.threads
    import onnxruntime

    info["onnxruntime"] = onnxruntime.__version__
    batches = [int(b) for b in args.batches.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for target in [None, *(float(t) for t in args.targets.split(","))]:
            model = dpcli.load(args.model)
            if target is not None:
                dpcli.prune(model, criterion="magnitude", target_macs=target, tolerance=1.0)
            name = "original" if target is None else f"pruned {target:g}"
            export = model.export(Path(folder) / f"{name.replace(' ', '-')}.onnx")
            summary = model.inspect()
            print(f"{name}: {summary['params']:,} params, {summary['macs']:,} MACs, export max abs diff "
                  f"{export.max_abs_diff:.2g}", flush=True)
            results.append({
                "model": name,
                "target_macs": target,
                "params": summary["params"],
                "macs": summary["macs"],
                "onnx_bytes": export.bytes,
                "export_seconds": export.seconds,
                "max_abs_diff": export.max_abs_diff,
                "timings": time_model(model, Path(export.output), batches, args.repeats, args.threads),
            })
    base = results[0]
    rows = []
    for result in results:
        macs_ratio = base["macs"] / result["macs"]
        result["macs_fraction"] = result["macs"] / base["macs"]
        cells = [result["model"], f"{result['params'] / 1e6:.2f} M",
                 f"{result['macs'] / 1e9:.2f} G ({result['macs_fraction']:.1%})"]
        for batch in batches:
            timing, base_timing = result["timings"][batch], base["timings"][batch]
            speedup = base_timing["onnxruntime_ms"] / timing["onnxruntime_ms"]
            timing["speedup"], timing["speedup_per_macs_ratio"] = speedup, speedup / macs_ratio
            cells += [f"{timing['onnxruntime_ms']:.1f}", f"{timing['torch_ms']:.1f}",
                      f"{speedup:.2f}x ({speedup / macs_ratio:.2f})"]
        rows.append(cells)
    headers = ["model", "params", "MACs (kept)"]
    for batch in batches:
        headers += [f"ORT ms b{batch}", f"torch ms b{batch}", f"ORT speedup b{batch} (/MACs-ratio)"]
    markdown = (
        f"`{args.model}` and its magnitude-pruned copies as ONNX (opset 17, dp export's exporter), one UNet "
        f"forward timed in onnxruntime {onnxruntime.__version__} on the CPU and in PyTorch eager (median of "
        f"{args.repeats} after {WARMUP} warm-up runs; {args.threads} thread(s), fp32).\n\n"
        + markdown_table(headers, rows) + "\n"
    )
    print(markdown)
    name = "export-quick" if args.quick else "export"
    write_results(name, {"settings": vars(args), "results": results}, markdown, info)


if __name__ == "__main__":
    main()
