"""Library errors as the CLI shows them: settings fields become the flags that set them."""

from dpcli.errors import BadSetting, DpError

# Fields whose flag is not ``--`` + the field name with dashes.
FLAGS = {
    "batch": "--latency-batch",  # LatencySettings.batch
    "global_batch": "global batch",  # --batch-size × processes × --grad-accum, recorded in checkpoints
    "reports": "--report",  # CompareSettings: one --report per model
}


def flag(field: str) -> str:
    """The command-line flag that sets the settings field ``field``."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def message(exc: DpError) -> str:
    """The text ``dp`` shows for ``exc``."""
    if isinstance(exc, BadSetting):
        return exc.render(flag)
    return str(exc)
