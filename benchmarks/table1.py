"""The paper's Table 1 in miniature, on the built-in digits DDPM, driven entirely through the `dp` CLI.

Usage:
    python benchmarks/table1.py            # the full run (resumable: rerun to continue; finished steps are skipped)
    python benchmarks/table1.py --quick    # smoke mode: 2 variants, 1 seed, a few steps (minutes)
    python benchmarks/table1.py --report   # only rebuild tables and plots from the runs recorded so far

What it does (every model operation is a `dp ... --json` subprocess; nothing from dpcli is imported):
1. Prune `builtin:ddpm-digits` to ~56 % of its MACs (`--target-macs 0.56`; the reachable fractions near one
   half on this UNet are 56 % and 35 %) with random, magnitude, taylor (all timesteps), diff-taylor at
   thresholds 0 / 0.05 / 0.1, and reinit (random pruning, then fresh weights = training the small shape
   from scratch). Taylor-family criteria go through `dp score ... -o scores` then `dp prune --scores`.
2. Fine-tune each pruned model with `dp finetune` (constant LR after warm-up, so a run can be continued
   in segments with `--resume --steps N'`; the first seed pair of each variant is evaluated after every
   segment: the recovery curve).
3. `dp eval` (DDIM, FID with the digits feature network against builtin:digits) of every model, and
   `dp compare --report ORIGINAL --report MODEL` for SSIM/PSNR to the original from the same noise (the
   original is sampled once, not once per run).
4. Seeds: the pruning seed and the fine-tune seed are varied separately, (prune, fine-tune) in
   --seed-pairs. Magnitude pruning has no randomness, so its runs vary the fine-tune seed only.
5. The threshold ablation (cutoff and SSIM without fine-tuning vs threshold, seed 0), the
   loss-vs-timestep curve, and the latency of each pruned shape (`dp compare` of the original and the
   pruned models, run alone at the end).

Results: benchmarks/results/table1/ (runs/*.json per run, summary.json, table1.md, PNGs). Scratch (models,
checkpoints, samples): --work (default /tmp/dp-table1), never committed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DP, RESULTS, describe_machine, machine_info, markdown_table, pyplot  # noqa: E402

BASE = "builtin:ddpm-digits"
DATA = "builtin:digits"
BASE_TRAIN_STEPS = 3000  # the built-in model's training (batch 64, AdamW 2e-4, EMA 0.999): see DESIGN.md
VARIANTS = {  # name -> (criterion, threshold)
    "random": ("random", None),
    "magnitude": ("magnitude", None),
    "taylor": ("taylor", None),
    "diff-taylor thr 0": ("diff-taylor", 0.0),
    "diff-taylor thr 0.05": ("diff-taylor", 0.05),
    "diff-taylor thr 0.1": ("diff-taylor", 0.1),
    "reinit (scratch)": ("reinit", None),
    # The unpruned base fine-tuned with the same recipe: how much of a pruned model's FID is just more training.
    "unpruned (control)": ("none", None),
}
# The same pruning constrained to the diffusers layout (dp prune --layout diffusers: one width per level, a
# config plain diffusers loads): what the constraint costs. Not in the default variants (benchmarks/layout.md).
LAYOUTS = {"diff-taylor thr 0.05 (diffusers layout)": "diffusers"}
VARIANTS.update({name: ("diff-taylor", 0.05) for name in LAYOUTS})
CONTROL = "unpruned (control)"  # shown beside the original, not ranked among the pruning criteria
DETERMINISTIC = {"magnitude", CONTROL}  # pruning without randomness: vary the fine-tune seed only
LOG_LOCK = threading.Lock()


def log(message: str) -> None:
    with LOG_LOCK:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def slug(text: str) -> str:
    return text.replace(" (diffusers layout)", "-diffusers").replace(" (scratch)", "").replace(" (control)", "").replace(" thr ", "-").replace(" ", "-")


def dp_json(args: list[str], env: dict, log_file: Path) -> dict:
    """Run `dp ARGS --json`; stderr goes to log_file; returns the parsed JSON (raises on failure)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_file, "a") as err:
        err.write(f"$ dp {' '.join(args)} --json\n")
        err.flush()
        proc = subprocess.run([str(DP), *args, "--json"], stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"dp {' '.join(args)} failed with exit code {proc.returncode}; see {log_file}")
    result = json.loads(proc.stdout)
    result["_wall_seconds"] = time.perf_counter() - started
    return result


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


class Runner:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work)
        self.out = Path(args.out)
        self.env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        self.locks: dict[str, threading.Lock] = {}
        self.locks_lock = threading.Lock()

    def lock(self, key: str) -> threading.Lock:
        with self.locks_lock:
            return self.locks.setdefault(key, threading.Lock())

    # -- pruning -------------------------------------------------------------------------------------------

    def prune_key(self, criterion: str, threshold, prune_seed: int, layout: str = "free") -> str:
        thr = "" if threshold is None else f"-thr{threshold:g}"
        return f"{criterion}{thr}-p{prune_seed}" + ("" if layout == "free" else f"-{layout}")

    def pruned(self, criterion: str, threshold, prune_seed: int, layout: str = "free") -> tuple[Path, dict]:
        """The pruned model folder and its record (scores: cutoff, losses; prune: sizes), made once.
        Criterion "none" (the control) is the unpruned base model itself."""
        if criterion == "none":
            original = read_json(self.out / "original.json")
            sizes = {"params_before": original["params"], "params_after": original["params"],
                     "macs_before": original["macs"], "macs_after": original["macs"], "macs_fraction": 1.0}
            return BASE, {"key": "none", "criterion": "none", "cutoff": None, **sizes}
        key = self.prune_key(criterion, threshold, prune_seed, layout)
        scores_key = self.prune_key(criterion, threshold, prune_seed)  # the layouts share the scores
        record_file = self.out / "prune" / f"{key}.json"
        folder = self.work / "pruned" / key
        with self.lock("prune:" + key):
            record = read_json(record_file)
            if record is not None and folder.is_dir():
                return folder, record
            logs = self.work / "logs" / f"prune-{key}.log"
            common = ["--seed", str(prune_seed)]
            score = None
            if criterion in ("taylor", "diff-taylor"):
                scores = self.work / "scores" / f"{scores_key}.safetensors"
                scores.parent.mkdir(parents=True, exist_ok=True)
                score_args = ["score", BASE, "--criterion", criterion, "--data", DATA, *common,
                              "--calib-size", str(self.args.calib_size), "-o", str(scores)]
                if threshold is not None:
                    score_args += ["--threshold", str(threshold)]
                if self.args.scan_timesteps:
                    score_args += ["--timesteps", str(self.args.scan_timesteps)]
                with self.lock("score:" + scores_key):
                    if not scores.is_file() or read_json(scores.with_suffix(".json")) is None:
                        log(f"score {scores_key}")
                        write_json(scores.with_suffix(".json"), dp_json(score_args, self.env, logs))
                    score = read_json(scores.with_suffix(".json"))
                source = ["--scores", str(scores)]
            else:
                source = ["--criterion", criterion, *common]
            log(f"prune {key}")
            report = dp_json(["prune", BASE, *source, "--target-macs", str(self.args.target_macs), "--yes",
                              "--layout", layout,
                              "--force", "-o", str(folder)], self.env, logs)
            record = {
                "key": key,
                "criterion": criterion,
                "threshold": threshold,
                "prune_seed": prune_seed,
                "layout": layout,
                "level_widths": report.get("level_widths"),
                "cutoff": score["cutoff"] if score else None,
                "timesteps_scanned": score["timesteps_scanned"] if score else None,
                "scan_seconds": score["scan_seconds"] if score else None,
                "losses": score["losses"] if score else None,
                **{k: report[k] for k in ("params_before", "params_after", "macs_before", "macs_after",
                                          "macs_fraction", "params_fraction", "ratio")},
                "prune_wall_seconds": report["_wall_seconds"] + (score["_wall_seconds"] if score else 0.0),
            }
            write_json(record_file, record)
            return folder, record

    # -- evaluation ----------------------------------------------------------------------------------------

    def evaluate(self, model: str, name: str, cache: bool = False) -> dict:
        """FID (dp eval) and SSIM/PSNR to the original (dp compare of the two saved reports).

        ``cache``: reuse an earlier evaluation of the same (unchanging) model folder."""
        cache_file = self.work / "eval-cache" / (Path(model).name + ".json")
        if cache and read_json(cache_file) is not None:
            return read_json(cache_file)
        folder = self.work / "eval" / name
        logs = self.work / "logs" / f"eval-{name}.log"
        sampling = ["--num-samples", str(self.args.num_samples), "--steps", str(self.args.eval_steps),
                    "--seed", "0"]
        report = dp_json(["eval", model, "--data", DATA, *sampling, "--no-latency", "--force", "-o", str(folder)],
                         self.env, logs)
        result = {"fid": report["fid"], "eval_seconds": report["_wall_seconds"]}
        if model != BASE:
            original = self.original_eval()
            compare = dp_json(["compare", "--report", str(original), "--report", str(folder), "--num-samples",
                               str(self.args.num_samples), "--no-latency", "--force",
                               "-o", str(self.work / "compare" / name)], self.env, logs)
            row = compare["models"][1]
            if row["ssim"] is None:
                raise RuntimeError(f"dp compare could not pair samples: {row.get('consistency_note')}")
            result.update(ssim=row["ssim"], psnr=row["psnr"])
        if cache:
            write_json(cache_file, result)
        return result

    def original_eval(self) -> Path:
        folder = self.work / "eval" / "original"
        with self.lock("eval:original"):
            record_file = self.out / "original.json"
            if read_json(record_file) is None or not (folder / "report.json").is_file():
                log("eval original")
                result = self.evaluate(BASE, "original")
                inspect = dp_json(["inspect", BASE], self.env, self.work / "logs" / "inspect.log")
                write_json(record_file, {**result, "params": inspect["params"], "macs": inspect["macs"]})
        return folder

    # -- one run: prune (shared) -> fine-tune in segments -> eval ------------------------------------------

    def run(self, variant: str, prune_seed: int, ft_seed: int, curve: bool) -> dict:
        criterion, threshold = VARIANTS[variant]
        name = f"{slug(variant)}-p{prune_seed}-f{ft_seed}"
        record_file = self.out / "runs" / f"{name}.json"
        record = read_json(record_file) or {}
        if record.get("complete") and record.get("steps") == self.args.steps:
            return record  # (a run recorded for fewer --steps is continued from its last checkpoint)
        self.original_eval()
        pruned, prune_record = self.pruned(criterion, threshold, prune_seed, LAYOUTS.get(variant, "free"))
        record.update(variant=variant, criterion=criterion, threshold=threshold, prune_seed=prune_seed,
                      ft_seed=ft_seed, prune=prune_record["key"], curve=curve, complete=False)
        record.setdefault("points", {})
        args = self.args
        if curve and "0" not in record["points"] and criterion != "none":
            log(f"eval {name} before fine-tuning")
            record["points"]["0"] = self.evaluate(str(pruned), f"{name}-s0", cache=True)
            write_json(record_file, record)
        stops = list(range(args.curve_every, args.steps, args.curve_every)) if curve else []
        stops.append(args.steps)
        output = self.work / "finetuned" / name
        for stop in stops:
            if str(stop) in record["points"]:
                continue
            resume = (output / "checkpoints").is_dir()
            log(f"finetune {name} -> step {stop}" + (" (resume)" if resume else ""))
            finetune = dp_json(["finetune", str(pruned), "--data", DATA, "--steps", str(stop),
                                "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup", str(args.warmup),
                                "--schedule", "constant", "--ema-decay", str(args.ema_decay), "--seed", str(ft_seed),
                                "--checkpoint-every", str(stop), "--keep-checkpoints", "1", "-o", str(output),
                                *(["--resume"] if resume else ["--force"])],
                               self.env, self.work / "logs" / f"finetune-{name}.log")
            if finetune["steps"] != stop:
                raise RuntimeError(f"{name}: fine-tune reports {finetune['steps']} steps, expected {stop}")
            log(f"eval {name} at step {stop}")
            point = self.evaluate(str(output), f"{name}-s{stop}")
            point.update(final_loss=finetune["final_loss"], steps_per_second=finetune["steps_per_second"],
                         finetune_wall_seconds=finetune["_wall_seconds"])
            record["points"][str(stop)] = point
            write_json(record_file, record)
        final = record["points"][str(args.steps)]
        record.update(fid=final["fid"], ssim=final["ssim"], psnr=final["psnr"], steps=args.steps,
                      params=prune_record["params_after"], macs=prune_record["macs_after"],
                      macs_fraction=prune_record["macs_fraction"], cutoff=prune_record["cutoff"], complete=True)
        write_json(record_file, record)
        log(f"done {name}: FID {record['fid']:.2f}, SSIM {record['ssim']:.3f}")
        return record

    # -- ablation and latency ------------------------------------------------------------------------------

    def ablation_point(self, threshold: float) -> dict:
        record_file = self.out / "ablation" / f"thr{threshold:g}.json"
        record = read_json(record_file)
        if record is not None:
            return record
        self.original_eval()
        pruned, prune_record = self.pruned("diff-taylor", threshold, 0)
        log(f"ablation: eval diff-taylor thr {threshold:g} without fine-tuning")
        result = self.evaluate(str(pruned), f"ablation-thr{threshold:g}", cache=True)
        record = {"threshold": threshold, "cutoff": prune_record["cutoff"],
                  "timesteps_scanned": prune_record["timesteps_scanned"], "scan_seconds": prune_record["scan_seconds"],
                  "params": prune_record["params_after"], "macs_fraction": prune_record["macs_fraction"], **result}
        write_json(record_file, record)
        return record

    def latency(self, variants: list[str]) -> dict:
        """ms per denoising step of the original and each variant's pruned shape (prune seed 0), alone."""
        record_file = self.out / "latency.json"
        record = read_json(record_file)
        variants = [variant for variant in variants if variant != CONTROL]  # the original's shape: timed already
        if record is not None and set(record["models"]) >= set(variants):
            return record
        models = {variant: self.pruned(*VARIANTS[variant], 0, LAYOUTS.get(variant, "free"))[0] for variant in variants}
        log("latency: dp compare of the original and the pruned shapes (run alone)")
        compare = dp_json(["compare", BASE, *map(str, models.values()), "--num-samples", "1", "--steps", "2",
                           "--repeats", str(self.args.latency_repeats), "--latency-batch", "64", "--force",
                           "-o", str(self.work / "compare" / "latency")], self.env, self.work / "logs" / "latency.log")
        rows = compare["models"]
        record = {"threads": self.args.threads, "repeats": self.args.latency_repeats, "batch": 64, "models": {}}
        for name, row in zip(["original", *models], rows, strict=True):
            record["models"][name] = {
                "batch_1_ms": row["latency"]["batch_1_ms"], "batch_ms": row["latency"]["batch_ms"],
                "speedup_batch_1": row["speedup_batch_1"], "speedup_batch": row["speedup_batch"],
                "speedup_per_macs_ratio_batch": row["speedup_per_macs_ratio_batch"],
            }
        write_json(record_file, record)
        return record


# -- statistics and report ---------------------------------------------------------------------------------


def bootstrap_mean_ci(values, resamples=10_000, seed=0, level=0.95):
    import numpy as np

    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return [float(low), float(high)]


def bootstrap_difference_ci(a, b, resamples=10_000, seed=0, level=0.95):
    """95 % bootstrap interval of mean(a) - mean(b) (independent resampling) and the fraction of
    resampled differences <= 0 (a one-sided bootstrap 'p' for a > b)."""
    import numpy as np

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return None
    rng = np.random.default_rng(seed)
    da = a[rng.integers(0, len(a), size=(resamples, len(a)))].mean(axis=1)
    db = b[rng.integers(0, len(b), size=(resamples, len(b)))].mean(axis=1)
    difference = da - db
    low, high = np.quantile(difference, [(1 - level) / 2, (1 + level) / 2])
    return {"ci": [float(low), float(high)], "p_not_greater": float((difference <= 0).mean())}


def summarise(out: Path, args) -> dict:
    import numpy as np

    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    runs = [r for r in runs if r.get("complete") and r.get("steps") == args.steps]
    original = read_json(out / "original.json")
    latency = read_json(out / "latency.json")
    variants = {}
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        if not mine:
            continue
        fids = [r["fid"] for r in mine]
        ssims = [r["ssim"] for r in mine]
        entry = {
            "runs": len(mine),
            "seed_pairs": [[r["prune_seed"], r["ft_seed"]] for r in mine],
            "fid": fids,
            "fid_mean": float(np.mean(fids)),
            "fid_std": float(np.std(fids, ddof=1)) if len(fids) > 1 else None,
            "fid_ci95": bootstrap_mean_ci(fids),
            "ssim": ssims,
            "ssim_mean": float(np.mean(ssims)),
            "ssim_std": float(np.std(ssims, ddof=1)) if len(ssims) > 1 else None,
            "psnr_mean": float(np.mean([r["psnr"] for r in mine])),
            "params": sorted({r["params"] for r in mine}),
            "macs": sorted({r["macs"] for r in mine}),
            "macs_fraction": float(np.mean([r["macs_fraction"] for r in mine])),
            "cutoffs": sorted({r["cutoff"] for r in mine if r["cutoff"] is not None}),
        }
        if latency and variant in latency["models"]:
            entry["latency"] = latency["models"][variant]
        curve = [r for r in mine if r.get("curve")]
        if curve:
            entry["curve"] = {int(k): v for k, v in curve[0]["points"].items()}
        variants[variant] = entry
    ranked = sorted((v for v in variants if v != CONTROL), key=lambda v: variants[v]["fid_mean"])
    if ranked:
        best = ranked[0]
        for variant in ranked[1:]:
            variants[variant]["vs_best"] = bootstrap_difference_ci(variants[variant]["fid"], variants[best]["fid"])
    ablation = sorted((json.loads(p.read_text()) for p in (out / "ablation").glob("*.json")),
                      key=lambda r: r["threshold"]) if (out / "ablation").is_dir() else []
    return {"original": original, "latency": latency, "variants": variants, "ranking_by_mean_fid": ranked,
            "ablation": ablation}


def implied_cutoff(losses: list, threshold: float) -> int:
    """The Diff-Pruning stopping rule applied to a recorded loss curve: the first t whose loss is below
    threshold × (running max so far); the last t when none is."""
    running = 0.0
    for t, loss in enumerate(losses):
        running = max(running, loss)
        if loss < threshold * running:
            return t
    return len(losses) - 1


def longest_scan(out: Path):
    scans = [read_json(f) for f in sorted((out / "prune").glob("diff-taylor-*-p0.json"))] if (out / "prune").is_dir() else []
    scans = [scan for scan in scans if scan and scan.get("losses")]
    return max(scans, key=lambda scan: len(scan["losses"])) if scans else None


def fmt(value, spec=".2f"):
    return "–" if value is None else format(value, spec)


def report(out: Path, args, info: dict, command: str) -> None:
    summary = summarise(out, args)
    summary["settings"] = {k: v for k, v in vars(args).items() if k not in ("report",)}
    summary["settings"]["thresholds"] = [float(t) for t in str(args.thresholds).split(",") if t]
    summary["finetune_fraction_of_base_training"] = args.steps / BASE_TRAIN_STEPS
    original, variants = summary["original"], summary["variants"]
    lines = [f"Fine-tune: {args.steps} steps = {args.steps / BASE_TRAIN_STEPS:.1%} of the base model's "
             f"{BASE_TRAIN_STEPS} training steps (batch {args.batch_size}, AdamW {args.lr:g}, {args.warmup} warm-up steps, "
             f"constant LR, EMA {args.ema_decay}). Eval: DDIM {args.eval_steps} steps, {args.num_samples} samples "
             f"(seed 0), FID with the digits feature network vs builtin:digits; SSIM/PSNR to the original from the "
             f"same noise. Pruning: --target-macs {args.target_macs}, calibration {args.calib_size} images. "
             f"OMP_NUM_THREADS={args.threads} per process, {args.workers} parallel worker(s).", ""]
    headers = ["variant", "runs", "params", "MACs", "FID mean ± std", "FID 95 % CI (bootstrap)", "FID per run",
               "SSIM mean ± std", "PSNR", "cutoff", "ms/step b1", "ms/step b64", "speedup b64"]
    rows = []
    if original:
        lat = (summary["latency"] or {}).get("models", {}).get("original", {})
        rows.append(["original", 1, f"{original['params'] / 1e6:.3f} M", f"{original['macs'] / 1e6:.1f} M (100 %)",
                     f"{original['fid']:.2f}", "–", "–", "1", "∞", "–", fmt(lat.get("batch_1_ms"), ".1f"),
                     fmt(lat.get("batch_ms"), ".0f"), "1.00"])
    for variant in [v for v in variants if v not in summary["ranking_by_mean_fid"]] + summary["ranking_by_mean_fid"]:
        v = variants[variant]
        lat = v.get("latency", {})
        ci = v["fid_ci95"]
        rows.append([
            variant, v["runs"], "/".join(f"{p / 1e6:.3f}" for p in v["params"]) + " M",
            "/".join(f"{m / 1e6:.1f}" for m in v["macs"]) + f" M ({v['macs_fraction']:.1%})",
            f"{v['fid_mean']:.2f} ± {fmt(v['fid_std'])}", f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "–",
            ", ".join(f"{x:.1f}" for x in v["fid"]), f"{v['ssim_mean']:.3f} ± {fmt(v['ssim_std'], '.3f')}",
            f"{v['psnr_mean']:.2f} dB", ",".join(map(str, v["cutoffs"])) or "–",
            fmt(lat.get("batch_1_ms"), ".1f"), fmt(lat.get("batch_ms"), ".0f"), fmt(lat.get("speedup_batch"))])
    lines.append(markdown_table(headers, rows))
    ranked = summary["ranking_by_mean_fid"]
    if len(ranked) > 1:
        lines += ["", f"Difference in mean FID to the best ({ranked[0]}), bootstrap 95 % interval (10k resamples):", ""]
        diff_rows = []
        for variant in ranked[1:]:
            d = variants[variant].get("vs_best")
            diff_rows.append([variant, f"{variants[variant]['fid_mean'] - variants[ranked[0]]['fid_mean']:+.2f}",
                              f"[{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]" if d else "–",
                              ("yes" if d["ci"][0] > 0 else "no") if d else "–"])
        lines.append(markdown_table(["variant", "Δ mean FID", "95 % CI", "CI excludes 0"], diff_rows))
    curves = {v: variants[v]["curve"] for v in variants if "curve" in variants[v]}
    if curves:
        steps = sorted({s for c in curves.values() for s in c})
        lines += ["", "Recovery curve (FID / SSIM after N fine-tune steps; first seed pair of each variant):", ""]
        lines.append(markdown_table(["variant", *map(str, steps)], [
            [v, *(f"{c[s]['fid']:.1f} / {c[s]['ssim']:.3f}" if s in c else "–" for s in steps)]
            for v, c in curves.items()]))
    if summary["ablation"]:
        lines += ["", "Threshold ablation (diff-taylor, prune seed 0, no fine-tuning):", ""]
        lines.append(markdown_table(["threshold", "cutoff t", "timesteps scanned", "scan s", "SSIM to original", "FID"], [
            [f"{a['threshold']:g}", a["cutoff"], a["timesteps_scanned"], f"{a['scan_seconds']:.0f}",
             f"{a['ssim']:.3f}", f"{a['fid']:.1f}"] for a in summary["ablation"]]))
    full = longest_scan(out)
    if full and len(full["losses"]) > 1:
        measured = {a["threshold"]: a["cutoff"] for a in summary["ablation"]}
        lines += ["", f"Cutoff implied by the recorded loss curve ({full['key']}: {len(full['losses'])} timesteps, "
                  "rule: first t with loss < threshold × running max), and the cutoff `dp score` reported:", ""]
        lines.append(markdown_table(["threshold", "implied cutoff", "dp score cutoff"], [
            [f"{t:g}", implied_cutoff(full["losses"], t) if t > 0 else len(full["losses"]) - 1,
             measured.get(t, "–")] for t in summary["settings"]["thresholds"]]))
    markdown = "\n".join(lines)
    print(markdown)
    info = {**info, "load_average_end": info.get("load_average_end") or list(os.getloadavg())}
    write_json(out / "summary.json", {"command": command, "machine": info, **summary})
    (out / "table1.md").write_text(f"# Table 1 on builtin:ddpm-digits\n\n`{command}`\n\n"
                                   f"Machine: {describe_machine(info)}\n\n{markdown}\n")
    plots(out, summary)


def plots(out: Path, summary: dict) -> None:
    plt = pyplot()
    variants = summary["variants"]
    if variants:
        names = summary["ranking_by_mean_fid"]
        fig, ax = plt.subplots(figsize=(8, 4))
        for i, name in enumerate(names):
            v = variants[name]
            ax.scatter([i] * len(v["fid"]), v["fid"], color="0.6", s=12, zorder=2)
            ci = v["fid_ci95"]
            err = [[v["fid_mean"] - ci[0]], [ci[1] - v["fid_mean"]]] if ci else None
            ax.errorbar([i], [v["fid_mean"]], yerr=err, fmt="o", color="C0", capsize=4, zorder=3)
        if summary["original"]:
            ax.axhline(summary["original"]["fid"], color="C2", linestyle="--", label="original (unpruned)")
            ax.legend()
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right")
        ax.set_ylabel("digits FID (lower is better)")
        ax.set_title("FID after fine-tuning: runs (grey), mean and bootstrap 95 % CI")
        fig.tight_layout()
        fig.savefig(out / "fid_by_criterion.png", dpi=110)
        plt.close(fig)
        curves = {v: variants[v]["curve"] for v in variants if "curve" in variants[v]}
        if curves:
            fig, axes = plt.subplots(1, 2, figsize=(10, 4))
            for name, curve in curves.items():
                steps = sorted(curve)
                axes[0].plot(steps, [curve[s]["fid"] for s in steps], marker="o", label=name)
                axes[1].plot(steps, [curve[s]["ssim"] for s in steps], marker="o", label=name)
            axes[0].set_yscale("log")
            axes[0].set_ylabel("FID (log)")
            axes[1].set_ylabel("SSIM to original")
            for ax in axes:
                ax.set_xlabel("fine-tune steps")
            if summary["original"]:
                axes[0].axhline(summary["original"]["fid"], color="k", linestyle="--", label="original")
            axes[0].legend(fontsize=7)
            fig.suptitle("Recovery during fine-tuning")
            fig.tight_layout()
            fig.savefig(out / "recovery_curves.png", dpi=110)
            plt.close(fig)
    ablation = summary["ablation"]
    if ablation:
        fig, ax = plt.subplots(figsize=(6, 4))
        thresholds = [a["threshold"] for a in ablation]
        ax.plot(thresholds, [a["ssim"] for a in ablation], marker="o", color="C0")
        ax.set_xlabel("threshold")
        ax.set_ylabel("SSIM to original, no fine-tuning", color="C0")
        twin = ax.twinx()
        twin.plot(thresholds, [a["cutoff"] for a in ablation], marker="s", color="C1")
        twin.set_ylabel("cutoff timestep", color="C1")
        ax.set_title("diff-taylor threshold ablation (prune seed 0)")
        fig.tight_layout()
        fig.savefig(out / "threshold_ablation.png", dpi=110)
        plt.close(fig)
    full = longest_scan(out)  # the longest scan (threshold 0: all timesteps)
    if full:
        losses = full["losses"]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(range(len(losses)), losses, color="C0")
        ax.set_yscale("log")
        ax.set_xlabel("timestep t")
        ax.set_ylabel("denoising loss at t (calibration batch)")
        running = [max(x for x in losses[: i + 1] if x is not None) for i in range(len(losses))]
        for j, threshold in enumerate(t for t in summary["settings"]["thresholds"] if t > 0):
            cutoff = implied_cutoff(losses, threshold)
            ax.axvline(cutoff, color=f"C{1 + j % 9}", linestyle=":", label=f"thr {threshold:g}: cutoff {cutoff}")
        ax.plot(range(len(running)), running, color="0.5", linewidth=0.8, label="running max")
        ax.legend(fontsize=7)
        ax.set_title("builtin:ddpm-digits: loss vs timestep (prune seed 0)")
        fig.tight_layout()
        fig.savefig(out / "loss_vs_timestep.png", dpi=110)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test from scratch: 2 variants, 1 seed pair, 10 steps, 32 samples (numbers meaningless)")
    parser.add_argument("--report", action="store_true", help="only rebuild the tables and plots")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/table1[-quick])")
    parser.add_argument("--work", default=None, help="scratch folder (default /tmp/dp-table1[-quick])")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each dp process")
    parser.add_argument("--variants", default=",".join(v for v in VARIANTS if v not in LAYOUTS))
    parser.add_argument("--seed-pairs", default="0:0,0:1,1:0,0:2,2:0",
                        help="prune:finetune seed pairs (the first one also records the recovery curve)")
    parser.add_argument("--steps", type=int, default=500, help="fine-tune steps (rerun with more to extend)")
    parser.add_argument("--curve-every", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--target-macs", type=float, default=0.56)
    parser.add_argument("--calib-size", type=int, default=32)
    parser.add_argument("--scan-timesteps", type=int, default=None, help="cap the timestep scan (quick mode)")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--eval-steps", type=int, default=50)
    parser.add_argument("--thresholds", default="0,0.01,0.02,0.05,0.1,0.2,0.3,0.5")
    parser.add_argument("--latency-repeats", type=int, default=10)
    parser.add_argument("--latency-only", action="store_true", help="only (re)measure the latency table")
    args = parser.parse_args()
    if args.quick:
        args.variants = "magnitude,diff-taylor thr 0.1"
        args.seed_pairs = "0:0"
        args.steps, args.curve_every, args.num_samples, args.eval_steps = 10, 5, 32, 10
        args.scan_timesteps, args.thresholds, args.latency_repeats = 50, "0.1", 2
    suffix = "-quick" if args.quick else ""
    args.out = args.out or str(RESULTS / f"table1{suffix}")
    args.work = args.work or f"/tmp/dp-table1{suffix}"
    out = Path(args.out)
    command = " ".join(["python", "benchmarks/table1.py", *sys.argv[1:]])
    info = machine_info(torch_info=False)
    info["torch_threads"] = args.threads
    if args.report:  # the tables describe the run: keep its command and machine info
        previous = read_json(out / "summary.json") or {}
        report(out, args, previous.get("machine", info), previous.get("command", command))
        return
    if args.quick and not args.report:  # a smoke test: always from scratch
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(args.work, ignore_errors=True)
    runner = Runner(args)
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if args.latency_only:
        (out / "latency.json").unlink(missing_ok=True)
        runner.latency(variants)
        report(out, args, info, command)
        return
    pairs = [tuple(map(int, pair.split(":"))) for pair in args.seed_pairs.split(",")]
    jobs = []
    for index, pair in enumerate(pairs):
        for variant in variants:
            prune_seed, ft_seed = pair
            if variant in DETERMINISTIC:  # no randomness in the pruning: vary the fine-tune seed only
                prune_seed, ft_seed = pairs[0][0], index
            jobs.append((variant, prune_seed, ft_seed, index == 0))
    thresholds = [float(t) for t in args.thresholds.split(",")] if args.thresholds else []
    started = time.time()
    log(f"{len(jobs)} runs, {len(thresholds)} ablation points, {args.workers} workers; results in {out}, scratch in {args.work}")
    failures = []
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        # queue order: the first seed pair of every variant, the ablation, then the other seed pairs
        first = [job for job in jobs if job[3]]
        rest = [job for job in jobs if job not in first]
        futures = {pool.submit(runner.run, *job): job for job in first}
        futures.update({pool.submit(runner.ablation_point, t): ("ablation", t) for t in thresholds})
        futures.update({pool.submit(runner.run, *job): job for job in rest})
        for future in concurrent.futures.as_completed(futures):
            try:
                future.result()
            except Exception as exc:  # keep the other runs going; the rerun retries this one
                failures.append((futures[future], exc))
                log(f"FAILED {futures[future]}: {exc}")
    if not failures:
        runner.latency(variants)
    log(f"finished in {(time.time() - started) / 60:.1f} min, {len(failures)} failure(s)")
    report(out, args, info, command)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
