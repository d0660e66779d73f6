"""A plugin claiming a criterion name (twin) that dpcli-taken-name claims as well."""

from dpcli.criteria import Criterion
from dpcli.hookspecs import hookimpl


class Twin(Criterion):
    name = "twin"
    description = "twin from dpcli-twin"


@hookimpl
def dpcli_register_criteria(register):
    register(Twin())
