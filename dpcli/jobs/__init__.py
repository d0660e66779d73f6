"""The jobs behind the commands: ``score``, ``prune``, ``finetune``, ``evaluate``, ``compare`` and ``export``.
Each owns its settings (flat, named as the command's options), validation and report, and has one entry,
``run(loaded, settings, *, output=None, reporter=None)``, that owns the output lock, the output folder, the
torchrun start and the writing. ``dpcli.api`` (the Python API) is their only caller; the CLI commands call
the API."""
