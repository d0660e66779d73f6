"""The streaming data layer (dpcli.data): memory of a real `dp finetune` run against the size of --data,
decode throughput by DataLoader workers, and fine-tuning steps/s before and after the data layer.

Usage: python benchmarks/data.py [--quick] [--sizes 4,1000,3000,10000] [--workers 1,2] [--repeats 2]
                                 [--old-sizes 4,1000,3000] [--decode-images 960] [--steps 20] [--rounds 3]
                                 [--old-commit cf5609f] [--skip-old] [--cache DIR]

1. Memory. `python -m dpcli finetune CONFIG --data DIR --steps 2 --batch-size 2 --workers W -o OUT --json`
   as a subprocess; CONFIG a random-weights UNet2DModel config.json (block_out_channels 16/32, 8 norm
   groups, sample_size 256, no attention), DIR a folder of N generated 256x256 JPEGs (gradients and waves
   plus mild noise, ~20 KB each; generated once into --cache, the folder of N images is hard links to the
   first N). The process tree (the main process and its DataLoader workers) is polled every 50 ms with
   psutil: the sums of PSS (a shared page split between the processes sharing it), RSS (a page a forked
   worker shares with the main process counted once per process) and USS (private pages); plus the
   kernel's exact high-water mark of the largest single process (wait4's ru_maxrss, what /usr/bin/time -v
   shows). A poll can miss a short peak, never invent one: each configuration runs --repeats times, the
   highest peaks count. Times: wall; when step 1 was done (its progress line on stderr, from launch:
   imports, the model, listing the data, worker start-up and one step); the run's own training-loop
   `seconds` (--json) and wall - loop (start-up plus writing the model and loss plot after the loop).
   The goal: the 3,000-image peak within 10 % of the 1,000-image peak and within 0.25 GB of the 4-image
   peak. The same command at --old-commit (no --workers there: it decoded the whole folder into one
   tensor in the main process) shows what the data layer replaced.
2. Decode throughput: images/s of `training_batches` on the 1,000 JPEGs at 256 px, batch 16, flip, for 0, 1
   and 2 workers; no model, one torch thread. Rounds alternate the worker counts; medians. Steady: from the
   first batch to the last (worker start-up excluded); with start-up: from creating the loader.
3. Fine-tuning steps/s before and after: `steps_per_second("config:ddpm-digits", 64, --steps)` from each
   commit's own benchmarks/finetune.py (builtin:digits, the first 2 steps excluded), in a subprocess with
   OMP_NUM_THREADS=1 and PYTHONPATH at that commit, alternating old, new, old, new, ... (--rounds each);
   new/old is also given per round (the pair ran back to back, under similar load). The old commit is
   checked out into a temporary git worktree (`git worktree add --detach`), removed afterwards.

Every subprocess runs with OMP_NUM_THREADS=1. --quick: 4, 1,000 and 3,000 images, 1 worker (the default on
2 cores), one run each; the old commit on 1,000 images only; 480 images decoded per run; 2 rounds of 20
steps (3-4 minutes on 2 shared cores). Full: adds 10,000 images and 2 workers, 2 runs each, the old commit
on 4, 1,000 and 3,000 images, 960 images decoded, 3 rounds (~9 minutes on 2 idle cores, plus generating
the images once, ~1.5 minutes).
Writes benchmarks/results/data[-quick].{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, machine_info, markdown_table, pyplot, write_results  # noqa: E402

sys.path.insert(0, str(ROOT))  # this checkout's dpcli, whatever is installed

GB = 1e9
POLL_SECONDS = 0.05
IMAGE_SIZE = 256
# A UNet small enough that its own memory and time do not hide the data's: two levels at 256 px, no
# attention (a mid-block attention over 128x128 = 16,384 tokens alone takes ~1 GB and ~8 s per step).
UNET_CONFIG = {
    "_class_name": "UNet2DModel",
    "sample_size": IMAGE_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
    "add_attention": False,
}
# Run in a subprocess at a commit: that commit's benchmarks/finetune.py `steps_per_second` (wall clock), with
# its step stamps also taken on the process's CPU clock (steps per CPU-second: what other jobs on the
# machine inflate least). Only the module's own `time` is swapped; dpcli's loop keeps the real one.
STEPS_CODE = """
import json, sys, time, types
sys.path.insert(0, "benchmarks")
import dpcli, finetune
cpu = []
def stamp():
    cpu.append(time.process_time())
    return time.perf_counter()
finetune.time = types.SimpleNamespace(perf_counter=stamp)
rate = finetune.steps_per_second("config:ddpm-digits", 64, {steps})
print(json.dumps({{"dpcli": dpcli.__file__, "rate": rate, "cpu_rate": (len(cpu) - 2) / (cpu[-1] - cpu[1])}}))
"""


# -- data --------------------------------------------------------------------------------------------------


def make_image(index: int, size: int = IMAGE_SIZE):
    """A photo-like RGB image: a random two-colour gradient, three low-frequency waves and mild noise
    (JPEG quality 93: ~19-23 KB at 256 px), the same for the same index."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * x + np.sin(angle) * y
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    pixels = low + (high - low) * ramp[..., None]
    for _ in range(3):
        fx, fy, phase = rng.uniform(1, 4), rng.uniform(1, 4), rng.uniform(0, 2 * np.pi)
        pixels += rng.uniform(10, 30, 3) * np.sin(2 * np.pi * (fx * x + fy * y) + phase)[..., None]
    pixels += rng.normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def image_folders(cache: Path, sizes: list[int]) -> dict[int, Path]:
    """``{N: folder of the first N images}``: images generated once into ``cache/all``, folders of hard
    links (symlinks where hard links fail), rebuilt when their count is wrong."""
    everything = cache / "all"
    everything.mkdir(parents=True, exist_ok=True)
    names = [f"{i:05d}.jpg" for i in range(max(sizes))]
    missing = [i for i, name in enumerate(names) if not (everything / name).is_file()]
    if missing:
        print(f"generating {len(missing):,} JPEGs into {everything} (once)", flush=True)
        for i in missing:
            partial = everything / f"{names[i]}.partial"
            make_image(i).save(partial, "JPEG", quality=93)
            partial.rename(everything / names[i])
    folders = {}
    for size in sizes:
        folder = cache / f"first-{size}"
        if not folder.is_dir() or len(list(folder.iterdir())) != size:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            for name in names[:size]:
                try:
                    os.link(everything / name, folder / name)
                except OSError:
                    (folder / name).symlink_to(everything / name)
        folders[size] = folder
    return folders


def folder_kilobytes(folder: Path) -> float:
    files = list(folder.iterdir())
    return sum(f.stat().st_size for f in files) / len(files) / 1024


# -- 1. memory of a dp finetune run ----------------------------------------------------------------------


def tree_memory(root) -> tuple[int, int, int, int]:
    """(PSS, RSS, USS, processes) summed over ``root`` and its descendants now."""
    import psutil

    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0, 0, 0
    pss = rss = uss = count = 0
    for process in processes:
        try:
            memory = process.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        pss, rss, uss, count = pss + memory.pss, rss + memory.rss, uss + memory.uss, count + 1
    return pss, rss, uss, count


def monitored(command: list[str], env: dict, cwd: Path, work: Path, first_line: str) -> dict:
    """Run ``command``, polling its process tree's memory; peaks, wall seconds, stdout, exit code, when
    ``first_line`` first appeared on its stderr (None: never) and the kernel's largest single-process RSS
    (wait4's ru_maxrss, what /usr/bin/time -v reports)."""
    import psutil

    out_path, err_path = work / "stdout.txt", work / "stderr.txt"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=cwd)
        root = psutil.Process(process.pid)
        peak = {"pss": 0, "rss": 0, "uss": 0, "processes": 0}
        samples, seen, monitor_cpu = 0, None, 0.0
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            now = time.perf_counter() - started
            if seen is None and first_line in err_path.read_text(errors="replace"):
                seen = now
            cpu = time.process_time()
            pss, rss, uss, count = tree_memory(root)
            monitor_cpu += time.process_time() - cpu
            samples += 1
            for key, value in (("pss", pss), ("rss", rss), ("uss", uss), ("processes", count)):
                peak[key] = max(peak[key], value)
            time.sleep(POLL_SECONDS)
        wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = out_path.read_text(), err_path.read_text(errors="replace")
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{stderr[-3000:]}")
    return {"peak": peak, "wall": wall, "stdout": stdout, "max_single_rss": usage.ru_maxrss * 1024,
            "first_line_seconds": seen, "samples": samples, "monitor_cpu": monitor_cpu}


def finetune_memory(tree: Path, config: Path, data: Path, workers: int | None, work: Path) -> dict:
    """One `dp finetune` run of ``tree``'s code on ``data`` (``workers`` None: the option is not passed)."""
    output = Path(tempfile.mkdtemp(dir=work))
    command = [sys.executable, "-m", "dpcli", "finetune", str(config), "--data", str(data), "--steps", "2",
               "--batch-size", "2", "-o", str(output / "out"), "--json"]
    if workers is not None:
        command += ["--workers", str(workers)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    # The progress line of step 1 (stderr is not a terminal: plain log lines, one per 5 % of the steps).
    run = monitored(command, env, tree, output, first_line="Fine-tuning  1/")
    shutil.rmtree(output, ignore_errors=True)
    report = json.loads(run["stdout"])
    return {
        "peak_pss_gb": run["peak"]["pss"] / GB,
        "peak_rss_gb": run["peak"]["rss"] / GB,
        "peak_uss_gb": run["peak"]["uss"] / GB,
        "max_single_process_rss_gb": run["max_single_rss"] / GB,
        "processes": run["peak"]["processes"],
        "wall_seconds": run["wall"],
        "loop_seconds": report["seconds"],
        "wall_minus_loop_seconds": run["wall"] - report["seconds"],
        "first_step_done_seconds": run["first_line_seconds"],
        "polls": run["samples"],
        "poll_interval_seconds": run["wall"] / max(1, run["samples"]),
        "monitor_cpu_seconds": run["monitor_cpu"],
    }


def combined(runs: list[dict]) -> dict:
    """Repeats of one configuration: the highest peaks (a poll can miss a short peak, never invent one),
    the median times, and every run."""
    result = {key: max(run[key] for run in runs) for key in runs[0] if key.startswith(("peak_", "max_"))}
    for key in runs[0]:
        if key not in result and runs[0][key] is not None and all(run[key] is not None for run in runs):
            result[key] = statistics.median(run[key] for run in runs)
    result["processes"] = max(run["processes"] for run in runs)
    result.setdefault("first_step_done_seconds", None)
    result["runs"] = runs
    return result


def memory_row(size: int, workers, run: dict) -> list:
    first = run["first_step_done_seconds"]
    return [f"{size:,}", workers, run["processes"], f"{run['peak_pss_gb']:.3f}", f"{run['peak_rss_gb']:.3f}",
            f"{run['peak_uss_gb']:.3f}", f"{run['max_single_process_rss_gb']:.3f}", f"{run['wall_seconds']:.1f}",
            "-" if first is None else f"{first:.1f}", f"{run['loop_seconds']:.1f}",
            f"{run['wall_minus_loop_seconds']:.1f}"]


def goal_rows(memory: dict, sizes: list[int]) -> tuple[list[dict], list[list]]:
    """Per workers count: the 3k/1k ratio and 3k - 4-image difference of the peaks (the goal), and the
    same for the largest size."""
    checks, rows = [], []
    small, one_k, three_k = min(sizes), 1000, 3000
    for workers, by_size in memory.items():
        if not {small, one_k, three_k} <= set(by_size):
            continue
        check = {"workers": workers}
        for kind, key in (("pss", "peak_pss_gb"), ("rss", "peak_rss_gb"), ("single_rss", "max_single_process_rss_gb")):
            check[f"{kind}_3k_over_1k"] = by_size[three_k][key] / by_size[one_k][key]
            check[f"{kind}_3k_minus_small_gb"] = by_size[three_k][key] - by_size[small][key]
            largest = max(by_size)
            check[f"{kind}_largest_minus_small_gb"] = by_size[largest][key] - by_size[small][key]
            check["largest"] = largest
        check["goal_met_pss"] = check["pss_3k_over_1k"] <= 1.10 and check["pss_3k_minus_small_gb"] <= 0.25
        check["goal_met_rss"] = check["rss_3k_over_1k"] <= 1.10 and check["rss_3k_minus_small_gb"] <= 0.25
        checks.append(check)
        rows.append([workers, f"{check['pss_3k_over_1k']:.3f}", f"{check['pss_3k_minus_small_gb']:+.3f}",
                     f"{check['rss_3k_over_1k']:.3f}", f"{check['rss_3k_minus_small_gb']:+.3f}",
                     f"{check['single_rss_3k_over_1k']:.3f}", f"{check['single_rss_3k_minus_small_gb']:+.3f}",
                     f"{check['largest']:,}: {check['pss_largest_minus_small_gb']:+.3f}",
                     "yes" if check["goal_met_pss"] else "**no**", "yes" if check["goal_met_rss"] else "**no**"])
    return checks, rows


# -- 2. decode throughput ----------------------------------------------------------------------------------


def decode_rates(folder: Path, images: int, workers_list: list[int], rounds: int) -> dict:
    import torch

    from dpcli.data import ImageTransform, open_source, training_batches

    torch.set_num_threads(1)
    source = open_source(str(folder))
    transform = ImageTransform(IMAGE_SIZE, 3, flip=True)
    batch = 16
    steps = images // batch
    for _ in training_batches(source, transform, seed=0, batch_size=batch, steps=2, workers=0):
        pass  # warm-up: the first batch imports torchvision's transforms
    steady = {w: [] for w in workers_list}
    total = {w: [] for w in workers_list}
    for _ in range(rounds):
        for workers in workers_list:
            started = time.perf_counter()
            batches = training_batches(source, transform, seed=0, batch_size=batch, steps=steps, workers=workers)
            first = None
            count = 0
            for item in batches:
                count += len(item)
                if first is None:
                    first = time.perf_counter()
            ended = time.perf_counter()
            assert count == steps * batch
            steady[workers].append((count - batch) / (ended - first))
            total[workers].append(count / (ended - started))
    return {w: {"images_per_second": statistics.median(steady[w]), "with_startup": statistics.median(total[w]),
                "all": steady[w], "all_with_startup": total[w]} for w in workers_list}


# -- 3. steps/s before and after ---------------------------------------------------------------------------


def digits_batch_cost(batches: int = 40) -> dict:
    """CPU and wall ms per `training_batches` batch of 64 builtin:digits at the size `config:ddpm-digits`
    trains on, 0 workers (the default for built-in data): the data path's share of a digits step."""
    import torch

    from dpcli.data import ImageTransform, open_source, training_batches
    from dpcli.loading import load_model

    torch.set_num_threads(1)
    loaded = load_model("config:ddpm-digits")
    adapter = loaded.adapter
    transform = ImageTransform(adapter.data_size(loaded), adapter.data_channels(loaded))
    source = open_source("builtin:digits")
    for _ in training_batches(source, transform, seed=0, batch_size=64, steps=2, workers=0):
        pass  # warm-up
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in training_batches(source, transform, seed=0, batch_size=64, steps=batches, workers=0):
        pass
    return {"size": transform.size, "cpu_ms": (time.process_time() - cpu) / batches * 1000,
            "wall_ms": (time.perf_counter() - wall) / batches * 1000}



def steps_rate(tree: Path, steps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-c", STEPS_CODE.format(steps=steps)], cwd=tree, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"steps/s at {tree} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not Path(result["dpcli"]).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"imported {result['dpcli']}, not the code at {tree}")
    return result


def old_worktree(commit: str, work: Path) -> Path:
    tree = work / f"old-{commit}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit], check=True,
                   capture_output=True)
    return tree


def remove_worktree(tree: Path) -> None:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)


# -- main --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", default="4,1000,3000,10000")
    parser.add_argument("--old-sizes", default="4,1000,3000", help="sizes also run (once) at --old-commit")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each memory configuration")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--decode-images", type=int, default=960)
    parser.add_argument("--decode-rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--old-commit", default="cf5609f")
    parser.add_argument("--skip-old", action="store_true")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "dpcli-bench-data")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.workers, args.decode_images, args.rounds = "4,1000,3000", "1", 480, 2
        args.old_sizes, args.repeats = "1000", 1
    sizes = sorted(int(s) for s in args.sizes.split(","))
    old_sizes = sorted(int(s) for s in args.old_sizes.split(",") if s and int(s) in sizes)
    workers_list = [int(w) for w in args.workers.split(",")]
    if not {1000, 3000} <= set(sizes):
        parser.error("--sizes must include 1000 and 3000 (the goal compares them)")
    info = machine_info()
    name = "data-quick" if args.quick else "data"
    started = time.perf_counter()
    folders = image_folders(args.cache, sizes)
    print(f"data ready ({time.perf_counter() - started:.0f} s): "
          f"{folder_kilobytes(folders[1000]):.1f} KB per JPEG on average", flush=True)

    results: dict = {"settings": vars(args) | {"cache": str(args.cache)}, "unet_config": UNET_CONFIG,
                     "mean_jpeg_kb": folder_kilobytes(folders[1000])}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        config = work / "unet" / "config.json"
        config.parent.mkdir()
        config.write_text(json.dumps(UNET_CONFIG))

        runs: dict[tuple[int, int], list[dict]] = {(w, s): [] for w in workers_list for s in sizes}
        for _ in range(args.repeats):
            for size in sizes:
                for workers in workers_list:
                    run = finetune_memory(ROOT, config, folders[size], workers, work)
                    runs[workers, size].append(run)
                    print(f"new, {size:>6,} images, {workers} worker(s): peak PSS {run['peak_pss_gb']:.3f} GB, "
                          f"RSS {run['peak_rss_gb']:.3f} GB, wall {run['wall_seconds']:.1f} s", flush=True)
        memory = {w: {s: combined(runs[w, s]) for s in sizes} for w in workers_list}
        results["memory"] = {str(w): {str(s): r for s, r in by_size.items()} for w, by_size in memory.items()}

        decode = decode_rates(folders[1000], args.decode_images, [0, 1, 2], args.decode_rounds)
        results["decode"] = {str(w): r for w, r in decode.items()}
        print("decode images/s:", {w: round(r["images_per_second"]) for w, r in decode.items()}, flush=True)
        results["digits_batch"] = digits_batch_cost()

        old_memory, rates, cpu_rates = {}, {"new": [], "old": []}, {"new": [], "old": []}
        if not args.skip_old:
            tree = old_worktree(args.old_commit, work)
            try:
                for size in old_sizes:
                    run = finetune_memory(tree, config, folders[size], None, work)
                    old_memory[size] = combined([run])
                    print(f"old, {size:>6,} images: peak PSS {run['peak_pss_gb']:.3f} GB, "
                          f"RSS {run['peak_rss_gb']:.3f} GB, wall {run['wall_seconds']:.1f} s", flush=True)
                for _ in range(args.rounds):
                    for label, code_tree in (("old", tree), ("new", ROOT)):
                        result = steps_rate(code_tree, args.steps)
                        rates[label].append(result["rate"])
                        cpu_rates[label].append(result["cpu_rate"])
                        print(f"{label}: {result['rate']:.3f} steps/s, {result['cpu_rate']:.3f} steps per "
                              "CPU-second", flush=True)
            finally:
                remove_worktree(tree)
        else:
            for _ in range(args.rounds):
                result = steps_rate(ROOT, args.steps)
                rates["new"].append(result["rate"])
                cpu_rates["new"].append(result["cpu_rate"])
        results["old_memory"] = {str(s): r for s, r in old_memory.items()}
        results["steps_per_second"] = {
            label: {"median": statistics.median(v), "all": v, "per_cpu_second_median": statistics.median(cpu_rates[label]),
                    "per_cpu_second_all": cpu_rates[label]}
            for label, v in rates.items() if v}

    checks, check_rows = goal_rows(memory, sizes)
    results["goal"] = checks
    results["seconds"] = time.perf_counter() - started

    memory_rows = []
    for size in sizes:
        memory_rows += [memory_row(size, workers, memory[workers][size]) for workers in workers_list]
        if size in old_memory:
            memory_rows.append(memory_row(size, f"before ({args.old_commit})", old_memory[size]))
    decode_rows = [[w, f"{r['images_per_second']:.0f}", f"{r['with_startup']:.0f}",
                    " / ".join(f"{v:.0f}" for v in r["all"])] for w, r in decode.items()]
    steps_rows = [[label if label == "new" else f"old ({args.old_commit})", f"{v['median']:.3f}",
                   f"{v['median'] * 64:.0f}", " / ".join(f"{x:.3f}" for x in v["all"]),
                   f"{v['per_cpu_second_median']:.3f}", " / ".join(f"{x:.3f}" for x in v["per_cpu_second_all"])]
                  for label, v in results["steps_per_second"].items()]
    if len(results["steps_per_second"]) == 2:
        summary = {}
        for key, values in (("wall", rates), ("cpu", cpu_rates)):
            paired = [new / old for old, new in zip(values["old"], values["new"], strict=True)]
            summary[key] = {"ratio_of_medians": statistics.median(values["new"]) / statistics.median(values["old"]),
                            "by_round": paired, "median_by_round": statistics.median(paired)}
        results["steps_per_second"]["new_over_old"] = summary
        steps_rows.append(["new / old", f"{summary['wall']['ratio_of_medians']:.2f}x", "",
                           " / ".join(f"{r:.2f}x" for r in summary["wall"]["by_round"]),
                           f"{summary['cpu']['ratio_of_medians']:.2f}x",
                           " / ".join(f"{r:.2f}x" for r in summary["cpu"]["by_round"])])

    markdown = (
        f"UNet2DModel config {UNET_CONFIG['block_out_channels']} channels, {UNET_CONFIG['norm_num_groups']} "
        f"norm groups, {IMAGE_SIZE} px, no attention, random weights; generated {IMAGE_SIZE}x{IMAGE_SIZE} JPEGs "
        f"({results['mean_jpeg_kb']:.1f} KB on average); every subprocess OMP_NUM_THREADS=1. "
        f"Total {results['seconds']:.0f} s.\n\n"
        "### Peak memory of `dp finetune CONFIG --data DIR --steps 2 --batch-size 2 --workers W`\n\n"
        f"Sums over the process tree (main process + DataLoader workers), polled every 50 ms; the highest of "
        f"{args.repeats} run(s) per row (median times; the `before` rows: one run); GB = 1e9 bytes. "
        "PSS splits shared pages between the processes sharing them; RSS counts a page a forked worker shares "
        "with the main process once per process; USS: private pages only. Max single RSS: the kernel's "
        "ru_maxrss (largest single process, what `/usr/bin/time -v` reports). Step 1 done at: when its "
        "progress line appeared on stderr, from launch (±50 ms). Loop: the run's own `seconds` (the training "
        "loop, DataLoader start-up included). Wall - loop: start-up before the loop plus writing the model "
        "and loss plot after it.\n\n"
        + markdown_table(["images", "workers", "processes", "peak PSS GB", "peak RSS GB (sum)", "peak USS GB",
                          "max single RSS GB", "wall s", "step 1 done at s", "loop s", "wall - loop s"],
                         memory_rows)
        + "\n\n### The goal: 3k peak within 10 % of 1k, and within 0.25 GB of the "
        f"{sizes[0]}-image run\n\n"
        + markdown_table(["workers", "PSS 3k / 1k", f"PSS 3k - {sizes[0]} GB", "RSS 3k / 1k",
                          f"RSS 3k - {sizes[0]} GB", "max single RSS 3k / 1k", f"max single RSS 3k - {sizes[0]} GB",
                          f"PSS largest - {sizes[0]} GB", "goal met (PSS)",
                          "goal met (RSS)"], check_rows)
        + f"\n\n### Decode throughput: `training_batches` on 1,000 JPEGs, {IMAGE_SIZE} px, batch 16, flip, "
        f"{args.decode_images} images per run, no model\n\n"
        f"Medians of {args.decode_rounds} rounds alternating the worker counts; steady = first batch to last.\n\n"
        + markdown_table(["workers", "images/s (steady)", "images/s (with start-up)", "all rounds (steady)"],
                         decode_rows)
        + f"\n\n### Fine-tuning `config:ddpm-digits` on builtin:digits, batch 64, {args.steps} steps "
        "(benchmarks/finetune.py's `steps_per_second`, each commit's own)\n\n"
        f"Alternating old, new ({args.rounds} rounds), one thread; steps per CPU-second: the same step stamps "
        "on the process's CPU clock (less sensitive to other jobs on the machine).\n\n"
        + markdown_table(["code", "steps/s (median)", "images/s", "all runs (steps/s)", "steps per CPU-s (median)",
                          "all runs (per CPU-s)"], steps_rows)
        + f"\n\nThe new data path alone (`training_batches` on builtin:digits, batch 64 at "
        f"{results['digits_batch']['size']} px, 0 workers): {results['digits_batch']['cpu_ms']:.1f} ms CPU "
        f"({results['digits_batch']['wall_ms']:.1f} ms wall) per batch"
        + (f", {results['digits_batch']['cpu_ms'] / 10 * results['steps_per_second']['new']['per_cpu_second_median']:.1f} "
           "% of a step's CPU time.\n" if "new" in results["steps_per_second"] else ".\n")
    )
    print(markdown)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for workers, by_size in memory.items():
        ax.plot(sizes, [by_size[s]["peak_pss_gb"] for s in sizes], "o-", label=f"PSS, {workers} worker(s)")
        ax.plot(sizes, [by_size[s]["peak_rss_gb"] for s in sizes], "x--", alpha=0.6,
                label=f"RSS sum, {workers} worker(s)")
    if old_memory:
        ax.plot(list(old_memory), [r["peak_pss_gb"] for r in old_memory.values()], "s-", color="black",
                label=f"PSS, before ({args.old_commit})")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("images in --data")
    ax.set_ylabel("peak memory of the process tree (GB)")
    ax.set_title("dp finetune, 256 px, batch 2, 2 steps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    write_results(name, results, markdown, info)


if __name__ == "__main__":
    main()
