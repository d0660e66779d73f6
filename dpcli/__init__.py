"""dpcli: structural pruning of diffusion models (Diff-Pruning) from the command line and from Python.

The Python API reads like the CLI (see ``dpcli.api``)::

    import dpcli

    model = dpcli.load("google/ddpm-cifar10-32")
    scores = dpcli.score(model, criterion="diff-taylor", data="images/", threshold=0.05)
    pruned = dpcli.prune(model, scores, target_macs=0.5)
    pruned.save("pruned/")

Importing this package stays cheap (no torch) so that ``dp --help`` does not pay for it: the API's names
are loaded on first use. Errors are ``dpcli.errors`` exceptions.
"""

from dpcli import errors

__version__ = "0.1.0"

# Public name -> the module that defines it, imported when the name is first used.
_API = {
    "Model": "dpcli.api",
    "Scores": "dpcli.api",
    "load": "dpcli.api",
    "score": "dpcli.api",
    "prune": "dpcli.api",
    "finetune": "dpcli.api",
    "evaluate": "dpcli.api",
    "compare": "dpcli.api",
    "export": "dpcli.api",
    "slice": "dpcli.slicing",
    "noise_generators": "dpcli.api",
    "Reporter": "dpcli.reporting",
    "update_model_card": "dpcli.io.model_card",
}

__all__ = ["__version__", "errors", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dpcli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
