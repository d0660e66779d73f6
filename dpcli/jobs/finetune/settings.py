"""The settings of a fine-tuning run (``FinetuneSettings``) and their validation."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpcli.data.base import DataSpec
from dpcli.errors import BadSetting

PRECISIONS = ("fp32", "bf16", "fp16")
CROPS = ("center", "random")
# Text models train on the empty prompt this often by default: Stable Diffusion 1.x was trained with 10 %
# text-conditioning dropout so classifier-free guidance has an unconditional branch, and a pruned UNet must
# relearn that branch too; 0 would let guidance degrade as fine-tuning goes on.
DEFAULT_CAPTION_DROPOUT = 0.1
SCHEDULES = ("cosine", "constant")


@dataclass
class FinetuneSettings:
    """Everything that decides a fine-tuning run (recorded in checkpoints and in the model's history).

    ``batch_size`` is per process and per micro-step; the global batch of one optimizer step is
    ``batch_size × world_size × grad_accum``. ``data`` is a ``DataSpec`` (or its source text);
    ``crop``/``flip`` augment the training images, ``caption_dropout`` trains text models on the empty
    prompt that often (None: ``DEFAULT_CAPTION_DROPOUT`` for text models), ``workers`` decode images
    (None: ``dpcli.data.default_workers``), ``cache_latents`` keeps LDM latents in that folder.
    ``gradient_checkpointing`` recomputes block activations in the backward (diffusers models);
    ``optimizer`` is one of ``dpcli.optimizers.OPTIMIZERS``; with ``precision`` bf16 the teacher is held in
    bfloat16.
    """

    data: DataSpec | str
    steps: int
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-4
    warmup: int = 0
    schedule: str = "cosine"
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "fp32"
    teacher: str | None = None
    distill_weight: float = 0.0
    reinit: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    crop: str = "center"
    flip: bool = False
    caption_dropout: float | None = None
    workers: int | None = None
    cache_latents: str | None = None
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"

    def __post_init__(self):
        if isinstance(self.data, str):
            self.data = DataSpec(self.data)

    def validate(self) -> None:
        checks = [  # (ok, field, what it must be, show the value given)
            (self.steps > 0, "steps", "must be at least 1", True),
            (self.batch_size > 0, "batch_size", "must be at least 1", True),
            (self.grad_accum > 0, "grad_accum", "must be at least 1", True),
            (self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number", True),
            (self.warmup >= 0, "warmup", "must be 0 or more", True),
            (self.schedule in SCHEDULES, "schedule", f"must be one of {', '.join(SCHEDULES)}", False),
            (self.weight_decay >= 0, "weight_decay", "must be 0 or more", True),
            (0.0 <= self.ema_decay < 1.0, "ema_decay", "must be in [0, 1)", True),
            (self.grad_clip >= 0, "grad_clip", "must be 0 (off) or more", True),
            (self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}", False),
            (self.distill_weight >= 0, "distill_weight", "must be 0 or more", True),
            (self.checkpoint_every >= 0, "checkpoint_every", "must be 0 (only at the end) or more", False),
            (self.keep_checkpoints >= 1, "keep_checkpoints", "must be at least 1", False),
            (self.crop in CROPS, "crop", f"must be one of {', '.join(CROPS)}", True),
            (
                self.caption_dropout is None or 0.0 <= self.caption_dropout <= 1.0,
                "caption_dropout",
                "must be in [0, 1]",
                True,
            ),
            (
                self.workers is None or self.workers >= 0,
                "workers",
                "must be 0 (decode in the main process) or more",
                True,
            ),
        ]
        from dpcli.optimizers import optimizer_class

        for ok, name, rule, show_value in checks:
            if not ok:
                got = getattr(self, name) if show_value else None
                raise BadSetting(name, "{" + name + "} " + rule, got=got)
        optimizer_class(self.optimizer)  # an unknown name, or its library missing: one line, nothing written
        if self.distill_weight > 0 and not self.teacher:
            raise BadSetting("distill_weight", "{distill_weight} needs {teacher} MODEL")
