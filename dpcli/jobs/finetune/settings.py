"""The settings of a fine-tuning run (``FinetuneSettings``) and their validation."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpcli.errors import BadSetting

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "constant")


@dataclass
class FinetuneSettings:
    """Everything that decides a fine-tuning run (recorded in checkpoints and in the model's history).

    ``batch_size`` is per process and per micro-step; the global batch of one optimizer step is
    ``batch_size × world_size × grad_accum``.
    """

    data: str
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
        ]
        for ok, name, rule, show_value in checks:
            if not ok:
                got = getattr(self, name) if show_value else None
                raise BadSetting(name, "{" + name + "} " + rule, got=got)
        if self.distill_weight > 0 and not self.teacher:
            raise BadSetting("distill_weight", "{distill_weight} needs {teacher} MODEL")
