"""The finetune job: ``settings`` (``FinetuneSettings``), ``loop`` (``finetune``, ``save_finetuned``) and
``checkpoints`` (exact resume)."""
