"""PNG plots people would rather look at than read."""

from __future__ import annotations

from pathlib import Path


def plot_losses(scan, path: Path, title: str = "") -> Path:
    """Per-timestep denoising loss of the scan, with the cutoff and threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    steps = list(range(len(scan.losses)))
    axis.plot(steps, scan.losses, marker="." if len(steps) < 60 else None, label="loss L_t")
    axis.axvline(scan.cutoff, color="tab:red", linestyle="--", label=f"cutoff t={scan.cutoff}")
    if scan.threshold > 0:
        running_max = []
        current = 0.0
        for loss in scan.losses:
            current = max(current, loss)
            running_max.append(current * scan.threshold)
        axis.plot(
            steps, running_max, color="tab:gray", linestyle=":", label=f"threshold × max ({scan.threshold})"
        )
    axis.set_xlabel("timestep t")
    axis.set_ylabel("MSE loss")
    axis.set_yscale("log")
    axis.set_title(title or "Diff-Pruning timestep scan")
    axis.legend()
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary)
    plt.close(figure)
    temporary.replace(path)
    return path
