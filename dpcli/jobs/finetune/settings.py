"""The settings of a fine-tuning run (``FinetuneSettings``) and their validation."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpcli.errors import BadInput

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
        checks = [
            (self.steps > 0, f"--steps must be at least 1, got {self.steps}"),
            (self.batch_size > 0, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.grad_accum > 0, f"--grad-accum must be at least 1, got {self.grad_accum}"),
            (self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number, got {self.lr}"),
            (self.warmup >= 0, f"--warmup must be 0 or more, got {self.warmup}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}"),
            (self.weight_decay >= 0, f"--weight-decay must be 0 or more, got {self.weight_decay}"),
            (0.0 <= self.ema_decay < 1.0, f"--ema-decay must be in [0, 1), got {self.ema_decay}"),
            (self.grad_clip >= 0, f"--grad-clip must be 0 (off) or more, got {self.grad_clip}"),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}"),
            (self.distill_weight >= 0, f"--distill-weight must be 0 or more, got {self.distill_weight}"),
            (self.checkpoint_every >= 0, "--checkpoint-every must be 0 (only at the end) or more"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadInput(message)
        if self.distill_weight > 0 and not self.teacher:
            raise BadInput("--distill-weight needs --teacher MODEL")
