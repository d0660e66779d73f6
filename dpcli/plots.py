"""PNG plots people would rather look at than read."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from dpcli.io.files import atomic_write

if TYPE_CHECKING:
    import torch


def plot_losses(scan, path: Path, title: str = "") -> Path:
    """Per-timestep denoising loss of the scan, with the cutoff and threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    steps = scan.scanned_timesteps
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
    with atomic_write(path, suffix=".png") as temporary:
        figure.savefig(temporary)
    plt.close(figure)
    return path


def plot_training(losses: list[float], lrs: list[float], path: Path, title: str = "") -> Path:
    """Training loss per step (raw and smoothed, log scale) with the learning rate on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    steps = list(range(1, len(losses) + 1))
    smoothed, average = [], 0.0
    for count, loss in enumerate(losses, 1):
        average = 0.98 * average + 0.02 * loss
        smoothed.append(average / (1 - 0.98**count))  # bias-corrected, as in the progress display
    axis.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    axis.plot(steps, smoothed, color="tab:blue", linewidth=1.8, label="loss (smoothed)")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss")
    if losses and min(losses) > 0:
        axis.set_yscale("log")
    lr_axis = axis.twinx()
    lr_axis.plot(steps, lrs, color="tab:orange", linewidth=1.2, label="learning rate")
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_ylim(bottom=0)
    handles = axis.get_legend_handles_labels()
    lr_handles = lr_axis.get_legend_handles_labels()
    axis.legend(handles[0] + lr_handles[0], handles[1] + lr_handles[1], loc="upper right")
    axis.set_title(title or "dp finetune")
    figure.tight_layout()
    with atomic_write(path, suffix=".png") as temporary:
        figure.savefig(temporary)
    plt.close(figure)
    return path


def grid_rows(images: torch.Tensor, columns: int | None = None) -> list[torch.Tensor]:
    """Split images into rows of ``columns`` (default: a square-ish grid)."""
    if len(images) == 0:
        return []
    columns = columns or math.ceil(math.sqrt(len(images)))
    return [images[start : start + columns] for start in range(0, len(images), columns)]


CAPTION_LINES = 4  # at most this many lines of caption above a column


def save_image_grid(rows, path: Path, pad: int = 2, min_cell: int = 64, captions: list | None = None) -> dict:
    """A PNG grid: one row per entry of ``rows`` (uint8 tensors [n, C, H, W]), image j of every row in
    column j. Small images are enlarged (nearest neighbour) to at least ``min_cell`` pixels; rows with
    fewer images leave their cells blank. ``captions`` (one per column, e.g. the prompt or class each
    column was sampled with) are written above the columns, wrapped to the cell width. Returns the path and
    the layout (rows, columns, cell, pad, the captions and the height of the caption band)."""
    import numpy as np
    from PIL import Image

    path = Path(path)
    columns = max((len(row) for row in rows), default=0)
    heights = [int(row.shape[-2]) for row in rows if len(row)]
    widths = [int(row.shape[-1]) for row in rows if len(row)]
    height, width = (max(heights), max(widths)) if heights else (1, 1)
    scale = max(1, -(-min_cell // max(height, width)))
    cell_h, cell_w = height * scale, width * scale
    captions = [str(c) if c is not None else "" for c in captions[:columns]] if captions else None
    wrapped = [_wrap(caption, cell_w) for caption in captions] if captions else []
    line_height = _font().getbbox("Ag")[3] + 2
    band = max((len(lines) for lines in wrapped), default=0) * line_height + (pad if wrapped else 0)
    canvas = np.full(
        (band + len(rows) * (cell_h + pad) + pad, max(columns, 1) * (cell_w + pad) + pad, 3),
        255,
        dtype=np.uint8,
    )
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            pixels = image.cpu().numpy()
            pixels = np.repeat(pixels, 3, axis=0) if pixels.shape[0] == 1 else pixels[:3]
            pixels = pixels.transpose(1, 2, 0).repeat(scale, axis=0).repeat(scale, axis=1)
            top, left = band + pad + r * (cell_h + pad), pad + c * (cell_w + pad)
            canvas[top : top + pixels.shape[0], left : left + pixels.shape[1]] = pixels
    picture = Image.fromarray(canvas)
    if wrapped:
        from PIL import ImageDraw

        draw = ImageDraw.Draw(picture)
        for c, lines in enumerate(wrapped):
            for number, line in enumerate(lines):
                draw.text(
                    (pad + c * (cell_w + pad), pad + number * line_height), line, fill=(0, 0, 0), font=_font()
                )
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return {
        "path": str(path),
        "rows": len(rows),
        "columns": columns,
        "cell": [cell_h, cell_w],
        "pad": pad,
        "captions": captions,
        "caption_height": band,
    }


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _wrap(text: str, width: int) -> list[str]:
    """``text`` in lines that fit ``width`` pixels (words split where they must), at most CAPTION_LINES;
    a cut caption ends in "..."."""
    font = _font()
    fits = lambda line: font.getlength(line) <= width  # noqa: E731
    lines, current = [], ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if fits(candidate):
            current = candidate
            continue
        if current:
            lines.append(current)
        while not fits(word) and len(word) > 1:
            cut = 1
            while cut < len(word) and fits(word[: cut + 1]):
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    if len(lines) > CAPTION_LINES:
        lines = lines[:CAPTION_LINES]
        last = lines[-1]
        while last and not fits(last + "..."):
            last = last[:-1]
        lines[-1] = last + "..."
    return lines
