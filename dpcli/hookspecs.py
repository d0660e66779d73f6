"""Hook specifications of dpcli plugins (pluggy project name ``dpcli``, entry-point group ``dpcli``).

A plugin is a module (or object) with functions marked ``@dpcli.hookspecs.hookimpl`` and named like
the specifications below. It is found through an entry point in the group ``dpcli``::

    [project.entry-points.dpcli]
    my-criteria = "my_package.plugin"

The built-in criteria and adapters are registered through these very hooks. Implementations may accept
fewer arguments than a specification lists, so new arguments never break existing plugins.
Keep plugin modules cheap to import (no torch at module level): they are imported whenever ``dp`` needs
its registry.
"""

import pluggy

hookspec = pluggy.HookspecMarker("dpcli")
hookimpl = pluggy.HookimplMarker("dpcli")


@hookspec
def dpcli_register_criteria(register):
    """Register importance criteria.

    :param register: call ``register(criterion)`` once per criterion. A criterion is an object with
        ``name`` (lower-case, dashes allowed; the value users pass to ``--criterion``), ``description``
        (one line), ``needs_data`` and ``needs_gradients`` (bools) and the scoring methods described in
        ``dpcli.criteria`` and docs/plugins.md.
    :return: nothing; return values are ignored.

    Called once per process, the first time a command needs the registry. A name that is already taken
    is rejected, and the rejection names both packages.
    """


@hookspec
def dpcli_register_adapters(register):
    """Register model adapters: the glue between ``dp`` and one family of diffusion models.

    :param register: call ``register(adapter)`` once per adapter. An adapter is an object with ``name``,
        ``description``, ``detect(source) -> float`` (0 = not mine, 1 = certainly mine) and
        ``load(source, config=None) -> dpcli.adapters.LoadedModel``, plus the methods of
        ``dpcli.adapters.base.ModelAdapter`` that pruning, fine-tuning and sampling use.
    :return: nothing; return values are ignored.

    Called once per process, the first time a command needs the registry. When several adapters
    recognise a model, the highest ``detect`` score wins; ``--adapter NAME`` overrides.
    """
