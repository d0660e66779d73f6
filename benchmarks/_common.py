"""Shared helpers of the benchmark scripts: machine info, result files (JSON + Markdown + PNG), tables.

No torch at import time (``machine_info`` imports it lazily), so the start-up benchmark can use it too.
Every script writes ``benchmarks/results/<name>.json`` and ``<name>.md`` (and PNGs beside them) through
:func:`write_results`; the JSON carries the machine info taken at the start and the end of the run.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DP = Path(sys.executable).with_name("dp")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return []


def machine_info(torch_info: bool = True) -> dict:
    """CPU model, cores, load average, Python, torch version and threads, GPU (if any), git commit."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_start": load_average(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        info["git_commit"] = commit.stdout.strip() or None
    except OSError:
        info["git_commit"] = None
    if torch_info:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def describe_machine(info: dict) -> str:
    """One Markdown line of machine info."""
    parts = [f"{info['cpu']}, {info['cores']} cores"]
    if info.get("torch"):
        parts.append(f"torch {info['torch']}, {info.get('torch_threads')} thread(s)")
    parts.append(f"GPU: {info.get('gpu') or 'none'}")
    start, end = info.get("load_average_start"), info.get("load_average_end")
    if start:
        parts.append(f"load average (1 min) {start[0]:.2f} at start" + (f", {end[0]:.2f} at end" if end else ""))
    parts.append(f"commit {info.get('git_commit')}, {info['date']}")
    return "; ".join(parts)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, data: dict, markdown: str, info: dict, folder: Path | None = None,
                  command: str | None = None) -> Path:
    """Write ``<folder>/<name>.json`` (data + machine info) and ``<name>.md`` (the tables); return the md path."""
    folder = Path(folder or RESULTS)
    folder.mkdir(parents=True, exist_ok=True)
    info = {**info, "load_average_end": load_average()}
    command = command or " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    payload = {"benchmark": name, "command": command, "machine": info, **data}
    (folder / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    text = f"# {name}\n\n`{command}`\n\nMachine: {describe_machine(info)}\n\n{markdown.strip()}\n"
    (folder / f"{name}.md").write_text(text)
    return folder / f"{name}.md"


def pyplot():
    """matplotlib with the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
