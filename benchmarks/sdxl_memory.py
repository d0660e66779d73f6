"""How dp's peak memory grows with the SDXL UNet's size: measured at reduced UNet widths, fitted, and
extrapolated to the full SDXL UNet (2,567,463,684 params) and the one pruned to ~50 % MACs (1,321,166,980).

This machine cannot run `dp score` of SDXL in float32 or `dp finetune` of SDXL, so this script measures
the REAL dp commands on SDXL-architecture pipelines whose UNet widths (block_out_channels 320/640/1280) are
scaled by S (benchmarks/sdxl_pipeline.py `--width-scale`; the autoencoder and both text encoders stay full
size, so the fixed part of the footprint is SDXL's), each command in a fresh process under
`/usr/bin/time -v` (benchmarks/sdxl.py's `timed`): peak RSS and user+sys CPU seconds. Jobs:

- `score-fp32`: `dp score PIPELINE --data IMAGES --calib-size 1 --batch-size 1 --chunk 1 --timesteps 2
  --weights-dtype fp32` (float32 weights, no autocast);
- `score-bf16`: the same with `--weights-dtype bf16 --precision bf16 --gradient-checkpointing
  --grad-sum-dtype weights` (the command measured at full size, 14.52 GB at 512 px, docs/benchmarks.md,
  before the float32 gradient sum became the default; scale 0.7 has about the pruned UNet's size);
- `score-bf16-fp32sum`: the same with the default `--grad-sum-dtype fp32` (scale 0.4 only: the
  difference to `score-bf16` there);
- `finetune`: `dp finetune PIPELINE --data IMAGES --steps 2 --batch-size 1 --precision bf16
  --gradient-checkpointing --workers 0 --checkpoint-every 0` (AdamW, EMA: float32 master weights);
- `finetune-teacher`: the same with `--teacher PIPELINE/unet` (the same-size UNet as its own teacher,
  held in bf16 under `--precision bf16`; a bare UNet folder, so no second set of encoders is loaded);
- `finetune-cache`: `finetune` with `--cache-latents DIR` (does the cache change what is resident?);
- `finetune-adamw8bit`: `--optimizer adamw8bit` (bitsandbytes; its 8-bit kernels need CUDA: recorded
  as not run when it fails here, with dp's error line);
- `libraries`: `python -c "import torch, diffusers, transformers, dpcli.api"`, the RSS no model adds.

Then, per job, a least-squares fit peak RSS = fixed + bytes_per_param × UNet params over the measured
scales, with residuals (sizes on a size-independent plateau left out: `fit`), extrapolated to the full
and the pruned SDXL UNet, and the bf16 score extrapolation checked against the full-size measurement. For
fine-tuning, the RSS sampled through the second step (`RssSampler`) is fitted too: the whole process's
peak at small sizes is the float32 load, not the training. A run whose predicted peak (the larger of the
fit of the scales already measured and the per-parameter theory) exceeds `--max-gb` is skipped and
recorded as such. All sizes at 512 px (64x64 latents), batch 1. Results: benchmarks/results/sdxl_memory[-quick].json,
.md. `--quick`: scales 0.1 and 0.2 only (about 10 minutes here; at most 9.1 GB per process).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, markdown_table, write_results  # noqa: E402
from sdxl import score_command, timed  # noqa: E402

PIPELINE_SCRIPT = Path(__file__).with_name("sdxl_pipeline.py")
FULL_PARAMS = 2_567_463_684
PRUNED_PARAMS = 1_321_166_980  # config:sdxl-base-1.0 pruned to ~50 % MACs (benchmarks/sdxl.py, measured)
# Full-size measurement to validate against (docs/benchmarks.md, benchmarks/results/sdxl-quick-score.json)
FULL_SCORE_BF16_512_GB = 14.52
GB = 1e9

# job: (theoretical bytes per UNet parameter, what they are, scales of the full run)
JOBS = {
    "score-bf16": (4, "bf16 weights 2 + bf16 gradients 2", [0.2, 0.4, 0.6, 0.7]),
    "score-bf16-fp32sum": (6, "bf16 weights 2 + float32 gradient sum 4", [0.4]),
    "finetune": (20, "float32 weights 4 + gradients 4 + AdamW moments 8 + EMA 4", [0.1, 0.2, 0.3]),
    "finetune-teacher": (22, "finetune 20 + the same-size teacher in bf16 2", [0.1, 0.2, 0.3]),
    "score-fp32": (8, "float32 weights 4 + gradients 4", [0.2, 0.3, 0.4]),
    "finetune-cache": (20, "as finetune (the encoders stay loaded)", [0.2]),
    "finetune-adamw8bit": (14, "finetune with 8-bit AdamW moments 2 instead of 8", [0.1]),
}
QUICK_SCALES = [0.1, 0.2]
# fixed part, for predicting a run before it is measured: libraries + encoders and VAE (float32 / bf16)
FIXED_GUESS_GB = {"fp32": 5.6, "bf16": 3.7}


def unet_params(pipeline: Path) -> int:
    """Parameters of ``pipeline``/unet, counted from the safetensors headers (no weights loaded)."""
    total = 0
    for shard in sorted((pipeline / "unet").glob("*.safetensors")):
        with shard.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dimension in entry["shape"]:
                    count *= dimension
                total += count
    return total


def write_pipelines(work: Path, scales: list[float], latent: int, pixels: int) -> dict:
    """One bf16 pipeline per scale under ``work`` (the first with the encoders, the rest linking them),
    and two captioned images; returns {scale: {"folder", "params", "write"}}."""
    made: dict[float, dict] = {}
    shared = None
    for scale in sorted(scales):
        folder = work / f"pipeline-{scale:g}"
        if not (folder / "model_index.json").is_file():
            shutil.rmtree(work / "tmp", ignore_errors=True)
            command = [sys.executable, str(PIPELINE_SCRIPT), str(work / "tmp"), "--dtype", "bf16"]
            command += ["--sample-size", str(latent), "--width-scale", str(scale)]
            if shared is not None:
                command += ["--components-from", str(shared)]
            if not (work / "images").is_dir():
                command += ["--images", "2", "--image-size", str(pixels)]
            _, stats = timed(command)
            (work / "tmp" / "pipeline").rename(folder)
            if (work / "tmp" / "images").is_dir():
                (work / "tmp" / "images").rename(work / "images")
            print(json.dumps({f"write pipeline {scale:g}": stats}), flush=True)
        else:
            stats = None
        if shared is None and not (folder / "vae").is_symlink():
            shared = folder
        made[scale] = {"folder": folder, "params": unet_params(folder), "write": stats}
    return made


class RssSampler:
    """Samples, every ``interval`` seconds in a thread, the RSS of the process whose command line holds
    ``needle`` (the dp process under /usr/bin/time) and how many records ``metrics`` (a fine-tuning run's
    OUT/metrics.jsonl) has by then. ``peak_between(1, 2)``: the peak of the second training step alone,
    when weights, gradients, optimizer state and EMA all exist, apart from loading before it and writing
    the model after it."""

    def __init__(self, needle: str, metrics: Path | None = None, interval: float = 0.2):
        import threading

        self.needle, self.metrics, self.interval = needle.encode(), metrics, interval
        self.samples: list[tuple[float, int]] = []  # (GB, records)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def pid(self) -> int | None:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    cmdline = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if (
                    self.needle in cmdline
                    and b"dpcli" in cmdline
                    and not cmdline.startswith(b"/usr/bin/time")
                ):
                    return int(entry.name)
        return None

    def run(self) -> None:
        pid = None
        while not self.stop.wait(self.interval):
            pid = pid or self.pid()
            if pid is None:
                continue
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                pid = None
                continue
            rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
            records = 0
            if self.metrics is not None and self.metrics.is_file():
                records = sum(1 for line in self.metrics.read_text().splitlines() if line.strip())
            self.samples.append((rss / 1e6, records))  # kB as /usr/bin/time's maximum RSS, / 1e6

    def peak_between(self, first: int, second: int) -> float | None:
        """The highest RSS sampled after record ``first`` and before record ``second`` was written."""
        inside = [gb for gb, count in self.samples if first <= count < second]
        return round(max(inside), 2) if inside else None

    def median_between(self, first: int, second: int) -> float | None:
        """The median RSS sampled between those records: what stays resident through the step, without
        its short-lived peaks."""
        import statistics

        inside = [gb for gb, count in self.samples if first <= count < second]
        return round(statistics.median(inside), 2) if inside else None


def command_for(job: str, pipeline: Path, images: Path, work: Path) -> list[str]:
    dp = [sys.executable, "-m", "dpcli"]
    if job.startswith("score"):
        dtype = job.split("-")[1]
        command = score_command(pipeline, images, dtype)
        if dtype == "bf16":
            # score-bf16 sums the gradients in bf16, as the full-size measurement it is checked against
            # (taken before --grad-sum-dtype existed); score-bf16-fp32sum: the default float32 sum
            command += ["--grad-sum-dtype", "fp32" if job.endswith("fp32sum") else "weights"]
        return command
    output = work / "finetuned"
    command = [*dp, "finetune", str(pipeline), "--data", str(images), "--steps", "2", "--batch-size", "1"]
    command += [
        "--precision",
        "bf16",
        "--gradient-checkpointing",
        "--workers",
        "0",
        "--checkpoint-every",
        "0",
    ]
    command += ["-o", str(output), "--force", "--json"]
    if job == "finetune-teacher":
        command += ["--teacher", str(pipeline / "unet")]
    if job == "finetune-cache":
        command += ["--cache-latents", str(work / "latents")]
    if job == "finetune-adamw8bit":
        command += ["--optimizer", "adamw8bit"]
    return command


def line_through(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares (fixed GB, GB per param) through (params, GB) points."""
    n = len(points)
    mean_x = sum(p for p, _ in points) / n
    mean_y = sum(g for _, g in points) / n
    sxx = sum((p - mean_x) ** 2 for p, _ in points)
    slope = sum((p - mean_x) * (g - mean_y) for p, g in points) / sxx
    return mean_y - slope * mean_x, slope


PLATEAU_GB = 0.1


def fit(points: list[tuple[int, float]]) -> dict | None:
    """Least squares peak = fixed + slope × params over (params, GB) points: fixed GB, bytes per param,
    residuals in GB (None with fewer than two sizes).

    At small sizes the peak can come from another phase than the one that grows with the UNet (encoding
    the calibration images with the full-size autoencoder, before any gradient exists): such a size sits
    on a plateau above the line through the larger sizes. While three or more sizes remain, the smallest
    is left out of the fit when it lies more than PLATEAU_GB above the line through the others; the left
    out sizes are reported (``plateau``) with their distance from the line."""
    points = sorted(points)
    if len({params for params, _ in points}) < 2:
        return None
    plateau = []
    while len(points) >= 3:
        fixed, slope = line_through(points[1:])
        above = points[0][1] - (fixed + slope * points[0][0])
        if above <= PLATEAU_GB:
            break
        plateau.append({"params": points[0][0], "gb": points[0][1], "above_line_gb": round(above, 3)})
        points = points[1:]
    fixed, slope = line_through(points)  # GB, GB per param
    residuals = [round(g - (fixed + slope * p), 3) for p, g in points]
    return {
        "fixed_gb": round(fixed, 3),
        "bytes_per_param": round(slope * GB, 2),
        "residuals_gb": residuals,
        "sizes": len(points),
        "plateau": plateau,
        "full_gb": round(fixed + slope * FULL_PARAMS, 2),
        "pruned_gb": round(fixed + slope * PRUNED_PARAMS, 2),
    }


def fit_with_width(points: list[tuple[int, float, float]]) -> dict | None:
    """Least squares peak = fixed + slope × params + per_width × width scale over (params, scale, GB)
    points: the activations at a fixed image size grow with the widths, not with the parameters (which
    grow about with the square of the width). Needs four sizes (three would fit exactly). The pruned
    UNet (30 % of the channels removed) counts as width 0.7."""
    import numpy as np

    if len({params for params, _, _ in points}) < 4:
        return None
    design = np.array([[1.0, params / GB, scale] for params, scale, _ in points])
    peaks = np.array([gb for _, _, gb in points])
    (fixed, slope, per_width), *_ = np.linalg.lstsq(design, peaks, rcond=None)
    residuals = peaks - design @ np.array([fixed, slope, per_width])
    return {
        "fixed_gb": round(float(fixed), 3),
        "bytes_per_param": round(float(slope), 2),
        "gb_per_width": round(float(per_width), 3),
        "residuals_gb": [round(float(r), 3) for r in residuals],
        "full_gb": round(float(fixed + slope * FULL_PARAMS / GB + per_width), 2),
        "pruned_gb": round(float(fixed + slope * PRUNED_PARAMS / GB + per_width * 0.7), 2),
    }


def predicted_gb(job: str, params: int, measured: dict) -> float:
    """The larger of two predictions: the fit of the sizes measured so far (when two or more) and the
    per-parameter theory over a guessed fixed part (a fit over sizes on a plateau underestimates)."""
    fixed = FIXED_GUESS_GB["bf16" if job.startswith("score-bf16") else "fp32"]
    theory = fixed + JOBS[job][0] * params / GB
    line = fit([(row["params"], row["max_rss_gb"]) for row in measured.get(job, [])])
    if line is None:
        return theory
    return max(theory, line["fixed_gb"] + line["bytes_per_param"] * params / GB)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help=f"scales {QUICK_SCALES} only")
    parser.add_argument("--jobs", default=",".join(["libraries", *JOBS]), help="comma-separated jobs")
    parser.add_argument("--scales", default=None, help="comma-separated width scales for every job")
    parser.add_argument("--max-gb", type=float, default=10.0, help="skip runs predicted above this peak RSS")
    parser.add_argument("--work", type=Path, default=None, help="folder for the pipelines (kept for reuse)")
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep the runs of the existing results file and measure only the (job, scale) pairs it lacks",
    )
    parser.add_argument("--redo", default="", help="with --append: comma-separated jobs to measure again")
    args = parser.parse_args()
    jobs = args.jobs.split(",")
    unknown = [job for job in jobs if job != "libraries" and job not in JOBS]
    if unknown:
        parser.exit(2, f"error: unknown job(s) {', '.join(unknown)}; known: libraries, {', '.join(JOBS)}\n")
    override = [float(scale) for scale in args.scales.split(",")] if args.scales else None
    plan = {
        job: override or (QUICK_SCALES if args.quick else JOBS[job][2]) for job in jobs if job != "libraries"
    }
    if args.quick:
        plan = {
            job: [s for s in scales if s in QUICK_SCALES] or [QUICK_SCALES[-1]]
            for job, scales in plan.items()
        }
    if "finetune-adamw8bit" in plan:
        plan["finetune-adamw8bit"] = plan["finetune-adamw8bit"][:1]
    info = machine_info()
    work = args.work or Path(tempfile.mkdtemp(prefix="dp-sdxl-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    latent, pixels = 64, 512
    pipelines = write_pipelines(work, sorted({s for scales in plan.values() for s in scales}), latent, pixels)
    images = work / "images"
    results: dict = {
        "pixels": pixels,
        "batch_size": 1,
        "max_gb": args.max_gb,
        "scales": {f"{s:g}": {"params": p["params"], "write": p["write"]} for s, p in pipelines.items()},
        "runs": {},
        "skipped": [],
        "failed": {},
    }
    measured: dict[str, list[dict]] = {}
    name = "sdxl_memory-quick" if args.quick else "sdxl_memory"
    previous = RESULTS / f"{name}.json"
    if args.append and previous.is_file():
        old = json.loads(previous.read_text())
        redo = set(args.redo.split(",")) if args.redo else set()
        measured = {job: list(rows) for job, rows in old.get("runs", {}).items() if job not in redo}
        results["scales"] = {**old.get("scales", {}), **results["scales"]}
        results["failed"] = {job: row for job, row in old.get("failed", {}).items() if job not in redo}
        if "libraries" in old:
            results["libraries"] = old["libraries"]
        if old.get("command"):
            info["appended_to"] = {"command": old["command"], "date": old.get("machine", {}).get("date")}
    if "libraries" in jobs and "libraries" not in results:
        code = "import torch, diffusers, transformers, dpcli.api, dpcli.adapters.ldm"
        _, stats = timed([sys.executable, "-c", code])
        results["libraries"] = stats
        print(json.dumps({"libraries": stats}), flush=True)
    for job, scales in plan.items():
        for scale in sorted(scales):
            params = pipelines[scale]["params"]
            if any(row["scale"] == scale for row in measured.get(job, [])) or job in results["failed"]:
                continue
            expected = predicted_gb(job, params, measured)
            if expected > args.max_gb:
                results["skipped"].append(
                    {"job": job, "scale": scale, "params": params, "predicted_gb": round(expected, 2)}
                )
                print(f"skip {job} at {scale:g}: predicted {expected:.1f} GB > {args.max_gb} GB", flush=True)
                continue
            command = command_for(job, pipelines[scale]["folder"], images, work)
            finetuning = job.startswith("finetune")
            metrics = work / "finetuned" / "metrics.jsonl" if finetuning else None
            with RssSampler(str(pipelines[scale]["folder"]), metrics) as sampler:
                result, stats = timed(command, check=False)
            if finetuning:
                # the second step's own peak: after the first step's record, before the second's
                stats["train_peak_gb"] = sampler.peak_between(1, 2)
                stats["train_resident_gb"] = sampler.median_between(1, 2)
            shutil.rmtree(work / "finetuned", ignore_errors=True)
            shutil.rmtree(work / "latents", ignore_errors=True)
            if result.returncode != 0:
                # the command's last line on stderr (dp's one-line error, or a traceback's exception),
                # not /usr/bin/time's report (tab-indented, after "Command exited ...")
                lines = [line for line in result.stderr.splitlines() if line.strip()]
                lines = [line for line in lines if not line.startswith(("\t", "Command "))]
                results["failed"][job] = {
                    "scale": scale,
                    "exit": result.returncode,
                    "error": lines[-1] if lines else "",
                    **stats,
                }
                print(json.dumps({job: results["failed"][job]}), flush=True)
                break
            row = {
                "scale": scale,
                "params": params,
                **stats,
                "cpu_s": round(stats["user_s"] + stats["sys_s"], 1),
            }
            measured.setdefault(job, []).append(row)
            print(json.dumps({job: row}), flush=True)
            save(results, measured, name, info)  # after every run: a stopped run keeps what it measured
    path = save(results, measured, name, info)
    print(path.read_text())


def save(results: dict, measured: dict, name: str, info: dict) -> Path:
    results["runs"] = measured
    results["fits"] = {
        job: fit([(row["params"], row["max_rss_gb"]) for row in rows]) for job, rows in measured.items()
    }
    # fine-tuning: what stays resident through the second training step (sampled), fitted alone
    results["fits_train"] = {
        job: fit([(row["params"], row["train_resident_gb"]) for row in rows if row.get("train_resident_gb")])
        for job, rows in measured.items()
        if job.startswith("finetune")
    }
    results["fits_with_width"] = {}
    for job, rows in measured.items():  # over the sizes the linear fit kept (not those on the plateau)
        plateau = {point["params"] for point in (results["fits"][job] or {}).get("plateau", [])}
        kept = [
            (row["params"], row["scale"], row["max_rss_gb"]) for row in rows if row["params"] not in plateau
        ]
        results["fits_with_width"][job] = fit_with_width(kept)
    summarise(results)
    return write_results(name, results, markdown(results), info)


def summarise(results: dict) -> None:
    """The validation against the full-size bf16 score, the teacher's own bytes per parameter, and the
    per-parameter terms alone (what a GPU holds for the UNet: the fit without its fixed term)."""
    fits = results["fits"]
    results["per_param_gb"] = {
        job: {
            "pruned": round(line["bytes_per_param"] * PRUNED_PARAMS / GB, 2),
            "full": round(line["bytes_per_param"] * FULL_PARAMS / GB, 2),
        }
        for job, line in fits.items()
        if line is not None
    }
    line = fits.get("score-bf16")
    if line and line["sizes"] < 3:
        # two sizes fit any line exactly, and small sizes sit on the plateau: nothing to validate
        results["validation"] = {"not_validated": f"score-bf16 fitted over {line['sizes']} sizes (3 needed)"}
    elif line:
        error = line["full_gb"] - FULL_SCORE_BF16_512_GB
        results["validation"] = {
            "measured_full_gb": FULL_SCORE_BF16_512_GB,
            "extrapolated_full_gb": line["full_gb"],
            "error_gb": round(error, 2),
            "error_percent": round(100 * error / FULL_SCORE_BF16_512_GB, 1),
        }
        width = results.get("fits_with_width", {}).get("score-bf16")
        if width:
            error = width["full_gb"] - FULL_SCORE_BF16_512_GB
            results["validation"]["with_width"] = {
                "extrapolated_full_gb": width["full_gb"],
                "error_gb": round(error, 2),
                "error_percent": round(100 * error / FULL_SCORE_BF16_512_GB, 1),
            }
    train = results.get("fits_train", {})
    if train.get("finetune") and train.get("finetune-teacher"):
        teacher = train["finetune-teacher"]["bytes_per_param"] - train["finetune"]["bytes_per_param"]
        student = train["finetune"]
        results["teacher_bytes_per_param"] = round(teacher, 2)
        # the recipe's case: the pruned student with the unpruned teacher
        results["pruned_student_full_teacher_gb"] = round(
            student["fixed_gb"] + (student["bytes_per_param"] * PRUNED_PARAMS + teacher * FULL_PARAMS) / GB, 2
        )


def markdown(results: dict) -> str:
    rows = []
    for job, runs in results["runs"].items():
        for row in runs:
            rows.append(
                [
                    job,
                    f"{row['scale']:g}",
                    f"{row['params']:,}",
                    f"**{row['max_rss_gb']:.2f} GB**"
                    + (
                        f" (step 2: peak {row['train_peak_gb']:.2f}, resident {row['train_resident_gb']:.2f} GB)"
                        if row.get("train_resident_gb")
                        else ""
                    ),
                    f"{row['cpu_s']:.0f} s",
                    f"{row['wall_s']:.0f} s",
                ]
            )
    parts = [
        f"Measured: peak RSS (`/usr/bin/time -v`, one fresh process per run) at {results['pixels']} px, batch 1; "
        "the UNet widths scaled, the autoencoder and both text encoders full size.",
        markdown_table(["job", "width scale", "UNet params", "peak RSS", "CPU (user+sys)", "wall"], rows),
    ]
    if "libraries" in results:
        parts.append(
            f"Libraries alone (`import torch, diffusers, transformers, dpcli`): "
            f"{results['libraries']['max_rss_gb']:.2f} GB."
        )
    fit_rows = []
    for job, line in results["fits"].items():
        if line is None:
            continue
        fit_rows.append(
            [
                job,
                f"{line['fixed_gb']:.2f} GB",
                f"**{line['bytes_per_param']:.2f}**",
                f"{JOBS[job][0]} ({JOBS[job][1]})",
                ", ".join(f"{r:+.2f}" for r in line["residuals_gb"]),
                f"{line['pruned_gb']:.1f} GB",
                f"{line['full_gb']:.1f} GB",
                f"{results['per_param_gb'][job]['pruned']:.1f} / {results['per_param_gb'][job]['full']:.1f} GB",
                f"{line['sizes']}"
                + "".join(
                    f" (left out: {point['params'] / 1e6:.0f} M at {point['gb']:.2f} GB, "
                    f"{point['above_line_gb']:+.2f} GB above the line: on the plateau)"
                    for point in line.get("plateau", [])
                ),
            ]
        )
    parts.append(
        "Fit peak RSS = fixed + bytes/param × UNet params (least squares), extrapolated (not measured) to the "
        f"pruned ({PRUNED_PARAMS:,}) and the full SDXL UNet ({FULL_PARAMS:,}):"
    )
    parts.append(
        markdown_table(
            [
                "job",
                "fixed",
                "bytes/param fitted",
                "bytes/param theory",
                "residuals",
                "pruned (extrapolated)",
                "full (extrapolated)",
                "per-param part (bytes/param × params): pruned / full",
                "sizes fitted",
            ],
            fit_rows,
        )
    )
    train_rows = [
        [
            job,
            f"{line['fixed_gb']:.2f} GB",
            f"**{line['bytes_per_param']:.2f}**",
            f"{JOBS[job][0]}",
            ", ".join(f"{r:+.2f}" for r in line["residuals_gb"]),
            f"{line['pruned_gb']:.1f} GB",
            f"{line['full_gb']:.1f} GB",
            f"{line['sizes']}",
        ]
        for job, line in results.get("fits_train", {}).items()
        if line is not None
    ]
    if train_rows:
        parts.append(
            "Fine-tuning, what stays resident through the second training step (median RSS sampled every 0.2 s "
            "between the first and the second step's record in metrics.jsonl: no loading, no writing):"
        )
        parts.append(
            markdown_table(
                [
                    "job",
                    "fixed",
                    "bytes/param fitted",
                    "theory",
                    "residuals",
                    "pruned (extrapolated)",
                    "full (extrapolated)",
                    "sizes fitted",
                ],
                train_rows,
            )
        )
    width_rows = [
        [
            job,
            f"{line['fixed_gb']:.2f} GB",
            f"**{line['bytes_per_param']:.2f}**",
            f"{line['gb_per_width']:+.2f} GB",
            ", ".join(f"{r:+.2f}" for r in line["residuals_gb"]),
            f"{line['pruned_gb']:.1f} GB",
            f"{line['full_gb']:.1f} GB",
        ]
        for job, line in results.get("fits_with_width", {}).items()
        if line is not None
    ]
    if width_rows:
        parts.append(
            "With an activation term that grows with the width scale (peak = fixed + bytes/param × params + "
            "c × scale; the pruned UNet counted as scale 0.7):"
        )
        parts.append(
            markdown_table(
                [
                    "job",
                    "fixed",
                    "bytes/param",
                    "c",
                    "residuals",
                    "pruned (extrapolated)",
                    "full (extrapolated)",
                ],
                width_rows,
            )
        )
    if "not_validated" in results.get("validation", {}):
        parts.append(f"Validation: not done, {results['validation']['not_validated']}.")
    elif "validation" in results:
        check = results["validation"]
        parts.append(
            f"Validation: `score-bf16` extrapolated to the full UNet gives {check['extrapolated_full_gb']:.2f} GB; "
            f"measured at full size {check['measured_full_gb']:.2f} GB: error {check['error_gb']:+.2f} GB "
            f"({check['error_percent']:+.1f} %)."
            + (
                f" With the activation term: {check['with_width']['extrapolated_full_gb']:.2f} GB, error "
                f"{check['with_width']['error_gb']:+.2f} GB ({check['with_width']['error_percent']:+.1f} %)."
                if "with_width" in check
                else ""
            )
        )
    if "teacher_bytes_per_param" in results:
        parts.append(
            f"Teacher (bf16): {results['teacher_bytes_per_param']:.2f} bytes per teacher parameter (finetune-teacher "
            f"minus finetune, step 2); the pruned student with the full teacher: {results['pruned_student_full_teacher_gb']:.1f} GB "
            "(extrapolated)."
        )
    for skip in results["skipped"]:
        parts.append(
            f"Skipped {skip['job']} at scale {skip['scale']:g}: predicted {skip['predicted_gb']} GB "
            f"> --max-gb {results['max_gb']}."
        )
    for job, failure in results["failed"].items():
        parts.append(
            f"Could not run {job} (scale {failure['scale']:g}, exit {failure['exit']}): `{failure['error']}`"
        )
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
