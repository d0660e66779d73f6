"""Deprecated: fine-tuning moved to the package ``dpcli.jobs.finetune`` (``settings``, ``loop``, ``checkpoints``)."""

from dpcli._deprecated import moved_names

__getattr__ = moved_names(
    __name__,
    {
        "FinetuneSettings": "dpcli.jobs.finetune.settings",
        "finetune": "dpcli.jobs.finetune.loop",
        "save_finetuned": "dpcli.jobs.finetune.loop",
    },
)
