"""The ``dp`` command line: a thin Typer layer over the dpcli library. No torch at import time."""
