"""Batches from a source through a torch DataLoader: examples are decoded lazily, in worker processes.

Two uses, one dataset class:

- ``training_batches``: the batches of fine-tuning steps ``start..steps-1``. The global batch of optimizer
  step ``s`` is the samples at positions ``s * global_batch ...`` of an endless stream of epochs, epoch ``e``
  a permutation of the data seeded by (seed, e); the random flip, crop and caption dropout of a sample come
  from (seed, its position). Each process asks only for its own rows (micro-step ``k`` of rank ``r``: rows
  ``(k * world_size + r) * batch_size`` onwards), so it decodes only its share, and a batch is the same
  whatever the number of processes or workers.
- ``example_batches``: given indices in order, no randomness (calibration images, FID reference images).

Memory: the source's index plus ``workers × prefetch`` batches in flight, whatever the size of the data.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from dpcli.data.base import Source
from dpcli.data.transforms import ImageTransform
from dpcli.errors import BadInput

# DataLoader workers by default: a 256-px JPEG takes 1-2 ms to decode and transform on one core (2-3 ms
# through a worker, which also ships the batch back), and a worker beyond the cores the model's own threads
# leave free only competes with them (benchmarks/data.py, docs/benchmarks.md).
MAX_DEFAULT_WORKERS = 8


def mixed_seed(seed: int, stream: str, index: int) -> int:
    """An independent 63-bit seed for item ``index`` of the named random ``stream`` of a run's ``seed``."""
    digest = hashlib.sha256(f"{seed}:{stream}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def default_workers(source: Source) -> int:
    """Worker processes for decoding: none for in-memory built-in data, else half the cores (at least 1,
    at most ``MAX_DEFAULT_WORKERS``), leaving the other half to the model."""
    if source.kind == "builtin":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_DEFAULT_WORKERS, cores // 2))


class DataOrder:
    """Sample positions 0, 1, 2, ... mapped to example indices through one seeded permutation per epoch."""

    def __init__(self, count: int, seed: int):
        self.count = count
        self.seed = seed
        self._permutations: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._permutations:
            if len(self._permutations) > 2:
                self._permutations.pop(min(self._permutations))
            generator = torch.Generator().manual_seed(mixed_seed(self.seed, "data", epoch))
            self._permutations[epoch] = torch.randperm(self.count, generator=generator)
        return self._permutations[epoch]

    def indices(self, start: int, length: int) -> torch.Tensor:
        positions = range(start, start + length)
        return torch.stack([self.permutation(p // self.count)[p % self.count] for p in positions])


@dataclass
class Batch:
    """Examples ready for ``ModelAdapter.prepare_batch``: ``pixels`` [B, C, H, W] in [-1, 1] (None when
    every row came from the latent cache), per-row ``captions`` and ``labels`` (None when the source has
    none), ``ids`` and source ``indices``, ``flipped``, ``cached`` latents by row, and each row's
    ``geometry`` (size before resizing, crop corner: SDXL's micro-conditioning)."""

    pixels: torch.Tensor | None
    captions: list[str] | None
    labels: torch.Tensor | None
    ids: list[str]
    indices: list[int]
    versions: list[str]
    flipped: list[bool]
    cached: dict[int, torch.Tensor]
    pixel_rows: list[int]
    geometry: list | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def pin_memory(self) -> Batch:
        """Page-locked copies for fast, asynchronous host-to-GPU transfer (the DataLoader calls this)."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


class ExampleDataset(torch.utils.data.Dataset):
    """Items are ``(index, position)``: the example to decode and, for training, its sample position
    (None: no random transform, no caption dropout)."""

    def __init__(
        self,
        source: Source,
        transform: ImageTransform,
        seed: int = 0,
        caption_dropout: float = 0.0,
        cache=None,
    ):
        self.source = source
        self.transform = transform
        self.seed = seed
        self.caption_dropout = caption_dropout
        self.cache = cache

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int | None]) -> dict:
        index, position = item
        try:
            generator = None
            if position is not None and self.transform.random:
                generator = torch.Generator().manual_seed(mixed_seed(self.seed, "augment", position))
            flip = self.transform.flips(generator)
            identity = self.source.identity(index) if self.cache is not None else None
            cached = self.cache.get(identity, flip) if identity is not None else None
            if cached is not None:
                latents, geometry = cached
                item = {
                    "latents": latents,
                    "geometry": geometry,
                    "caption": self.source.caption(index),
                    "label": self.source.label(index),
                }
                item["id"], item["version"] = identity
            else:
                example = self.source.example(index)
                pixels, _, geometry = self.transform.apply(example.image, generator, flip=flip)
                item = {"pixels": pixels, "geometry": geometry, "caption": example.caption}
                item["label"], item["id"], item["version"] = example.label, example.id, example.version
            item["caption"] = self._dropout(item["caption"], position)
            return {**item, "flip": flip, "index": index}
        except BadInput as exc:  # carried to the main process as data: a worker's exception loses its text
            return {"error": str(exc)}

    def _dropout(self, caption: str | None, position: int | None) -> str | None:
        """The empty prompt instead of the caption with probability ``caption_dropout`` (training only)."""
        if caption is not None and position is not None and self.caption_dropout > 0:
            generator = torch.Generator().manual_seed(mixed_seed(self.seed, "caption", position))
            if float(torch.rand(1, generator=generator)) < self.caption_dropout:
                return ""
        return caption


def collate(items: list[dict]) -> Batch | BadInput:
    """Stack decoded items into a Batch (in the worker). An unreadable example gives the BadInput instead,
    raised by ``_raising`` in the main process: raised in a worker, its message would be lost."""
    errors = [item["error"] for item in items if "error" in item]
    if errors:
        return BadInput(errors[0])
    pixel_rows = [row for row, item in enumerate(items) if "pixels" in item]
    captions = [item["caption"] for item in items]
    labels = [item["label"] for item in items]
    return Batch(
        pixels=torch.stack([items[row]["pixels"] for row in pixel_rows]) if pixel_rows else None,
        captions=None if all(c is None for c in captions) else [c or "" for c in captions],
        labels=None if any(label is None for label in labels) else torch.tensor(labels, dtype=torch.long),
        ids=[item["id"] for item in items],
        indices=[item["index"] for item in items],
        versions=[item["version"] for item in items],
        flipped=[bool(item["flip"]) for item in items],
        cached={row: item["latents"] for row, item in enumerate(items) if "latents" in item},
        pixel_rows=pixel_rows,
        geometry=[item["geometry"] for item in items],
    )


def _quiet_worker(worker_id: int) -> None:
    """Ctrl-C and SIGTERM reach the whole process group; the main process decides (finish the step, write
    a checkpoint) and ends the workers itself, so a worker must not die first."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _raising(batches) -> Iterator[Batch]:
    for batch in batches:
        if isinstance(batch, BadInput):
            raise batch
        yield batch


def _loader(dataset, batch_sampler, workers: int, pin_memory: bool) -> Iterator[Batch]:
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers else None,
        worker_init_fn=_quiet_worker if workers else None,
    )
    return _raising(loader)


def example_batches(
    source: Source,
    transform: ImageTransform,
    indices: Sequence[int] | None = None,
    batch_size: int = 64,
    workers: int | None = None,
) -> Iterator[Batch]:
    """The examples at ``indices`` (all, in order, by default) in batches of ``batch_size``, untouched by
    random transforms (calibration and reference images)."""
    indices = list(range(len(source))) if indices is None else [int(i) for i in indices]
    chunks = [[(i, None) for i in indices[s : s + batch_size]] for s in range(0, len(indices), batch_size)]
    workers = default_workers(source) if workers is None else workers
    workers = min(workers, len(chunks))
    return _loader(ExampleDataset(source, transform), chunks, workers, pin_memory=False)


class _StepSampler(torch.utils.data.Sampler):
    """This process's micro-batches of steps ``start..steps-1``, in order."""

    def __init__(self, count, seed, batch_size, world_size, rank, grad_accum, start_step, steps):
        super().__init__()
        self.order = DataOrder(count, seed)
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.grad_accum, self.start_step, self.steps = grad_accum, start_step, steps

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.grad_accum

    def __iter__(self):
        global_batch = self.batch_size * self.world_size * self.grad_accum
        for step in range(self.start_step, self.steps):
            for micro in range(self.grad_accum):
                first = step * global_batch + (micro * self.world_size + self.rank) * self.batch_size
                indices = self.order.indices(first, self.batch_size).tolist()
                yield [(index, first + row) for row, index in enumerate(indices)]


def training_batches(
    source: Source,
    transform: ImageTransform,
    *,
    seed: int,
    batch_size: int,
    grad_accum: int = 1,
    world_size: int = 1,
    rank: int = 0,
    start_step: int = 0,
    steps: int,
    workers: int | None = None,
    caption_dropout: float = 0.0,
    pin_memory: bool = False,
    cache=None,
) -> Iterator[Batch]:
    """The micro-batches this process trains on for steps ``start_step..steps-1``: ``grad_accum`` per step,
    decoded by ``workers`` processes ahead of the model (see the module docstring for the order)."""
    sampler = _StepSampler(len(source), seed, batch_size, world_size, rank, grad_accum, start_step, steps)
    dataset = ExampleDataset(source, transform, seed=seed, caption_dropout=caption_dropout, cache=cache)
    workers = default_workers(source) if workers is None else workers
    return _loader(dataset, sampler, workers, pin_memory)
