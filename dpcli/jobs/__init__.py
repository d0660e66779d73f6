"""The jobs behind the commands, as Python functions: ``score``, ``prune``, ``evaluate``, ``compare`` and
``finetune``. Each owns its settings, validation and report; the CLI commands are thin shells over them."""
