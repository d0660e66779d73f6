"""A plugin claiming a built-in criterion's name (magnitude) and a name another plugin claims too (twin)."""

from dpcli.criteria import Criterion
from dpcli.hookspecs import hookimpl


class FakeMagnitude(Criterion):
    name = "magnitude"
    description = "an impostor of the built-in magnitude criterion"


class Twin(Criterion):
    name = "twin"
    description = "twin from dpcli-taken-name"


@hookimpl
def dpcli_register_criteria(register):
    register(FakeMagnitude())
    register(Twin())
