"""A plugin whose hook raises half-way: what it registered before the error must not be usable."""

from dpcli.criteria import Criterion
from dpcli.hookspecs import hookimpl


class HalfDone(Criterion):
    name = "half-done"
    description = "registered just before the hook fails"


@hookimpl
def dpcli_register_criteria(register):
    register(HalfDone())
    raise RuntimeError("the plugin's registry is corrupt")
