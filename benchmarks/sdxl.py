"""SDXL at scale on this machine: `dp prune --target-macs 0.5` on the SDXL UNet, the pruned UNet's speed,
and `dp score` at batch 1.

The model is `config:sdxl-base-1.0` (the real SDXL base UNet config, random weights: speed and sizes do not
depend on the values). Three steps (`--steps`, default all), each in its own processes so that one peak
RSS is measured per step:

1. prune: `/usr/bin/time -v dp prune CONFIG --criterion magnitude --target-macs 0.5 --tolerance 0.02`
   (the ratio search predicts each trial from kept widths, `dpcli.macs_table`; the result is counted by
   fvcore). Wall time, user+sys CPU time, max RSS, MACs fraction, ratio and trials.
2. speed: one batch-1 denoising forward (no grad, float32) of the original and of the pruned UNet, each
   in a fresh process, median of `--repeats` after one warm-up; on CUDA too when a GPU is present.
3. score: `dp score` at batch 1 (`--calib-size 1 --batch-size 1 --chunk 1 --timesteps N`: N batch-1
   forward+backward passes, `--score-timesteps`, default 2) on a full SDXL base pipeline with random
   weights written offline by benchmarks/sdxl_pipeline.py (the real UNet, VAE and both text encoder
   configs, an offline tokenizer) and captioned images of the run's size, with `--weights-dtype bf16
   --precision bf16 --gradient-checkpointing`; `--score-dtypes bf16,fp32` adds fp32 (its weights and
   gradients alone are 20.6 GB: more than this 24 GB machine leaves). Wall, CPU, max RSS, s per sample.

`--quick` runs at 512x512 pixels (64x64 latents: the config written with `sample_size` 64), the full run
at SDXL's native 1024x1024 (128x128 latents). Results: benchmarks/results/sdxl[-quick][-STEPS].json, .md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine_info, markdown_table, write_results  # noqa: E402

CONFIG = ROOT / "dpcli" / "resources" / "configs" / "sdxl-base-1.0.json"


def timed(command: list[str], check: bool = True) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``command`` under ``/usr/bin/time -v``: its result and wall/user/sys seconds and max RSS
    (``check``: exit with its stderr when it fails)."""
    started = time.perf_counter()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    stats = {"wall_s": round(wall, 1)}
    for key, pattern in (
        ("user_s", r"User time \(seconds\): ([\d.]+)"),
        ("sys_s", r"System time \(seconds\): ([\d.]+)"),
        ("max_rss_gb", r"Maximum resident set size \(kbytes\): (\d+)"),
    ):
        found = re.search(pattern, result.stderr)
        if found:
            value = float(found.group(1))
            stats[key] = round(value / 1e6, 2) if key == "max_rss_gb" else value
    if check and result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result, stats


SPEED = r"""
import json, statistics, sys, time, torch
from dpcli.loading import load_model
loaded = load_model(sys.argv[1])
adapter = loaded.adapter
loaded.model.eval()
out = {"params": sum(p.numel() for p in loaded.model.parameters())}
devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
for device in devices:
    loaded.model.to(device)
    inputs = adapter.example_inputs(loaded, batch_size=1)
    times = []
    with torch.no_grad():
        for i in range(int(sys.argv[2]) + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            adapter.predict(loaded, *inputs)
            if device == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - started)
    out[device] = statistics.median(times)
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="512x512 pixels (64x64 latents) instead of 1024x1024"
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards per model (after one warm-up)")
    parser.add_argument(
        "--model",
        choices=["sdxl", "sd15"],
        default="sdxl",
        help="sd15: the same steps on the SD 1.5 UNet config at 512 px, to compare with "
        "benchmarks/ldm_sd15.md (the search over pruned copies)",
    )
    parser.add_argument("--work", type=Path, default=None, help="folder for the config and the pruned model")
    parser.add_argument("--steps", default="prune,speed,score", help="comma-separated: prune, speed, score")
    parser.add_argument("--score-dtypes", default="bf16", help="comma-separated weights dtypes to score in")
    parser.add_argument("--score-timesteps", type=int, default=2, help="timesteps (batch-1 passes) scored")
    args = parser.parse_args()
    steps = set(args.steps.split(","))
    info = machine_info()
    work = args.work or Path(tempfile.mkdtemp(prefix="dp-sdxl-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.model == "sd15":
        from sd15_pipeline import SD15_UNET

        config, latent, label = {"_class_name": "UNet2DConditionModel", **SD15_UNET}, 64, "sd15"
    else:
        config, latent, label = json.loads(CONFIG.read_text()), 64 if args.quick else 128, "sdxl-base-1.0"
    config["sample_size"] = latent
    config_file = work / f"{label}-{latent * 8}px.json"
    config_file.write_text(json.dumps(config))
    pruned = work / "pruned"
    rows: list[list[str]] = []
    results: dict = {"latent_size": latent}
    pixels = latent * 8
    if "prune" in steps:
        rows += prune_step(config_file, pruned, pixels, results)
    if "speed" in steps:
        rows += speed_step(config_file, pruned, pixels, args.repeats, results)
    if "score" in steps and args.model == "sdxl":
        rows += score_step(work, latent, args.score_dtypes.split(","), args.score_timesteps, results)
    title = (
        "SD 1.5 UNet config, random weights"
        if args.model == "sd15"
        else "SDXL base UNet (config:sdxl-base-1.0, random weights)"
    )
    markdown = markdown_table([title, "result"], rows)
    name = "sdxl-sd15" if args.model == "sd15" else ("sdxl-quick" if args.quick else "sdxl")
    if args.steps != "prune,speed,score":
        name += "-" + "-".join(sorted(steps))
    path = write_results(name, results, markdown, info)
    print(path.read_text())


def prune_step(config_file: Path, pruned: Path, pixels: int, results: dict) -> list[list[str]]:
    command = [
        sys.executable,
        "-m",
        "dpcli",
        "prune",
        str(config_file),
        "--criterion",
        "magnitude",
        "--target-macs",
        "0.5",
        "--tolerance",
        "0.02",
        "-o",
        str(pruned),
        "--json",
        "--yes",
        "--force",
    ]
    result, prune_stats = timed(command)
    report = json.loads(result.stdout)
    prune = {
        **prune_stats,
        "ratio": report["ratio"],
        "trials": len(report["trials"]),
        "params_before": report["params_before"],
        "params_after": report["params_after"],
        "macs_before": report["macs_before"],
        "macs_after": report["macs_after"],
        "macs_fraction": round(report["macs_fraction"], 4),
        "prune_seconds": round(report["prune_seconds"], 1),
    }
    print(json.dumps({"prune": prune}), flush=True)
    results["prune"] = prune
    return [
        [
            "`dp prune --target-macs 0.5` wall / CPU (user+sys)",
            f"{prune['wall_s']:.0f} s / {prune['user_s'] + prune['sys_s']:.0f} s",
        ],
        ["`dp prune` max RSS", f"{prune['max_rss_gb']:.2f} GB"],
        ["search", f"ratio {prune['ratio']}, {prune['trials']} trials (predicted from widths, no copies)"],
        ["UNet params before → after", f"{prune['params_before']:,} → {prune['params_after']:,}"],
        [
            f"UNet MACs per step at {pixels} px (fvcore) before → after",
            f"{prune['macs_before'] / 1e9:.1f} G → {prune['macs_after'] / 1e9:.1f} G "
            f"({prune['macs_fraction']:.1%}, target 50 % ± 2 %)",
        ],
    ]


def speed_step(config_file: Path, pruned: Path, pixels: int, repeats: int, results: dict) -> list[list[str]]:
    speed = {}
    for name, spec in (("original", str(config_file)), ("pruned", str(pruned))):
        result, stats = timed([sys.executable, "-c", SPEED, spec, str(repeats)])
        speed[name] = {**json.loads(result.stdout.strip().splitlines()[-1]), "process": stats}
        print(json.dumps({name: speed[name]}), flush=True)
    speedup = {d: speed["original"][d] / speed["pruned"][d] for d in ("cpu", "cuda") if d in speed["pruned"]}

    results["speed"], results["speedup"] = speed, speedup
    fraction = results.get("prune", {}).get("macs_fraction")
    ratio = f" for MACs ratio {1 / fraction:.2f}x" if fraction else ""
    rows = [
        [
            f"batch-1 forward, CPU fp32, {pixels} px: original / pruned",
            f"{speed['original']['cpu']:.2f} s / {speed['pruned']['cpu']:.2f} s: speedup {speedup['cpu']:.2f}x"
            + ratio,
        ],
    ]
    if "cuda" in speedup:
        rows.append(
            [
                f"batch-1 forward, CUDA fp32, {pixels} px: original / pruned",
                f"{speed['original']['cuda'] * 1e3:.1f} ms / {speed['pruned']['cuda'] * 1e3:.1f} ms: "
                f"speedup {speedup['cuda']:.2f}x",
            ]
        )
    else:
        rows.append(["CUDA", "not run (no GPU on this machine)"])
    return rows


def score_command(pipeline: Path, images: Path, dtype: str, timesteps: int = 2) -> list[str]:
    """`dp score` at batch 1 (one calibration image, one timestep per pass) with weights in ``dtype``;
    bf16/fp16 also under that autocast precision, with gradient checkpointing."""
    command = [sys.executable, "-m", "dpcli", "score", str(pipeline), "--data", str(images)]
    command += ["--calib-size", "1", "--batch-size", "1", "--chunk", "1", "--timesteps", str(timesteps)]
    command += ["--weights-dtype", dtype, "--json"]
    if dtype != "fp32":
        command += ["--precision", dtype, "--gradient-checkpointing"]
    return command


def score_step(work: Path, latent: int, dtypes: list[str], timesteps: int, results: dict) -> list[list[str]]:
    """`dp score` at batch 1 on a random-weight SDXL pipeline folder (benchmarks/sdxl_pipeline.py)."""
    pixels = latent * 8
    images = work / f"images-{pixels}"
    rows, score = [], {}
    for dtype in dtypes:
        pipeline = work / f"pipeline-{dtype}-{pixels}"
        if not (pipeline / "model_index.json").is_file():
            command = [sys.executable, str(Path(__file__).with_name("sdxl_pipeline.py")), str(work / "tmp")]
            _, build = timed(
                [
                    *command,
                    "--dtype",
                    dtype,
                    "--sample-size",
                    str(latent),
                    "--images",
                    "2",
                    "--image-size",
                    str(pixels),
                ]
            )
            (work / "tmp" / "pipeline").rename(pipeline)
            if not images.is_dir():
                (work / "tmp" / "images").rename(images)
            print(json.dumps({f"pipeline {dtype}": build}), flush=True)
        command = score_command(pipeline, images, dtype, timesteps)
        result, stats = timed(command)
        report = json.loads(result.stdout)
        per_sample = report["scan_seconds"] / report["samples"]
        score[dtype] = {
            **stats,
            "samples": report["samples"],
            "scan_seconds": round(report["scan_seconds"], 1),
            "seconds_per_sample": round(per_sample, 1),
        }
        print(json.dumps({f"score {dtype}": score[dtype]}), flush=True)
        label = f"`dp score` batch 1, {pixels} px, " + (
            "fp32"
            if dtype == "fp32"
            else f"--weights-dtype {dtype} --precision {dtype} --gradient-checkpointing"
        )
        rows.append([f"{label}: max RSS", f"{stats['max_rss_gb']:.2f} GB"])
        rows.append(
            [
                f"{label}: per sample (forward+backward) / process wall / CPU",
                f"{per_sample:.1f} s / {stats['wall_s']:.0f} s / {stats['user_s'] + stats['sys_s']:.0f} s",
            ]
        )
    results["score"] = score
    return rows


if __name__ == "__main__":
    main()
