"""The settings of a fine-tuning run (``FinetuneSettings``) and their validation."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field, fields

from dpcli.data.base import DataOptions, DataSpec, settings_data_spec
from dpcli.errors import BadSetting

PRECISIONS = ("fp32", "bf16", "fp16")
CROPS = ("center", "random")
# Text models train on the empty prompt this often by default: Stable Diffusion 1.x was trained with 10 %
# text-conditioning dropout so classifier-free guidance has an unconditional branch, and a pruned UNet must
# relearn that branch too; 0 would let guidance degrade as fine-tuning goes on.
DEFAULT_CAPTION_DROPOUT = 0.1
SCHEDULES = ("cosine", "constant")
REPORT_TO = ("none", "tensorboard", "wandb")

# Field metadata: a REPORTED setting is printed in the report and kept in the model's history; a RESUMED one
# also must be the same in a resumed run as in its checkpoint (else the result is not the run it continues).
REPORTED = {"report": True}
RESUMED = {"report": True, "resume": True}


def tracker_installed(name: str) -> bool:
    """Whether the package of tracker ``name`` can be imported (checked without importing it)."""
    return name == "none" or importlib.util.find_spec(name) is not None


def default_report_to() -> str:
    """``tensorboard`` when it is installed, else ``none``."""
    return "tensorboard" if tracker_installed("tensorboard") else "none"


@dataclass
class FinetuneSettings(DataOptions):
    """Everything that decides a fine-tuning run (recorded in checkpoints and in the model's history).

    ``batch_size`` is per process and per micro-step; the global batch of one optimizer step is
    ``batch_size × world_size × grad_accum``. ``data`` is a ``DataSpec`` (or its source text);
    ``crop``/``flip`` augment the training images, ``caption_dropout`` trains text models on the empty
    prompt that often (None: ``DEFAULT_CAPTION_DROPOUT`` for text models), ``workers`` decode images
    (None: ``dpcli.data.default_workers``), ``cache_latents`` keeps LDM latents in that folder.
    ``report_to`` picks the tracker (None: ``default_report_to()``); every ``validate_every`` steps (0: never)
    ``validation_samples`` images of the EMA weights are sampled, with ``validation_prompt`` for text models
    (see ``dpcli.jobs.finetune.monitor``).
    ``gradient_checkpointing`` recomputes block activations in the backward (diffusers models);
    ``optimizer`` is one of ``dpcli.optimizers.OPTIMIZERS``; with ``precision`` bf16 the teacher is held in
    bfloat16.
    """

    data: DataSpec | str | None = field(metadata=RESUMED)
    steps: int
    batch_size: int = field(default=16, metadata=REPORTED)
    grad_accum: int = field(default=1, metadata=REPORTED)
    lr: float = field(default=2e-4, metadata=RESUMED)
    warmup: int = field(default=0, metadata=RESUMED)
    schedule: str = field(default="cosine", metadata=RESUMED)
    weight_decay: float = field(default=0.0, metadata=RESUMED)
    ema_decay: float = field(default=0.999, metadata=RESUMED)
    grad_clip: float = field(default=1.0, metadata=RESUMED)
    seed: int = field(default=0, metadata=RESUMED)
    precision: str = field(default="fp32", metadata=RESUMED)
    teacher: str | None = field(default=None, metadata=RESUMED)
    distill_weight: float | None = field(default=None, metadata=RESUMED)  # None: 1 with a teacher, else 0
    reinit: bool = field(default=False, metadata=RESUMED)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    crop: str = field(default="center", metadata=RESUMED)
    flip: bool = field(default=False, metadata=RESUMED)
    caption_dropout: float | None = field(default=None, metadata=RESUMED)
    workers: int | None = None
    cache_latents: str | None = None
    device: str = "auto"  # where it trains (dpcli.runtime.start_distributed)
    report_to: str | None = None
    validate_every: int = 0
    validation_samples: int = 16
    validation_prompt: list[str] = field(default_factory=list)
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"

    def __post_init__(self):
        self.data = settings_data_spec(self)
        if self.data is None:
            raise BadSetting(
                "data", "{data} is required: an image folder, a dataset, tar shards or builtin:digits"
            )
        if self.distill_weight is None:
            self.distill_weight = 1.0 if self.teacher else 0.0
        if self.cache_latents is not None:
            self.cache_latents = str(self.cache_latents)
        if self.teacher is not None:
            self.teacher = str(self.teacher)
        self.validation_prompt = list(self.validation_prompt or [])

    @classmethod
    def marked(cls, key: str) -> tuple[str, ...]:
        """The names of the fields whose metadata marks them ``key`` (``report`` or ``resume``)."""
        return tuple(f.name for f in fields(cls) if f.metadata.get(key))

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
            (self.validate_every >= 0, "validate_every", "must be 0 (off) or more", True),
            (self.validation_samples >= 1, "validation_samples", "must be at least 1", True),
            (
                self.report_to is None or self.report_to in REPORT_TO,
                "report_to",
                f"must be one of {', '.join(REPORT_TO)}",
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
        if self.report_to and not tracker_installed(self.report_to):
            raise BadSetting(
                "report_to",
                "{report_to} {name} needs the {name} package (pip install {name}); or {report_to} none",
                name=self.report_to,
            )
        if self.validation_prompt and not self.validate_every:
            raise BadSetting("validation_prompt", "{validation_prompt} is used with {validate_every} N")
