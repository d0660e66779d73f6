"""Old import paths promised to plugin authors (docs/plugins.md), kept working with a DeprecationWarning."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def moved_names(old_module: str, new_homes: dict[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` that serves ``name`` from ``new_homes[name]`` and warns once per use."""

    def __getattr__(name: str) -> Any:
        if name not in new_homes:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        warnings.warn(
            f"{old_module}.{name} is deprecated; import it from {new_homes[name]}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(new_homes[name]), name)

    return __getattr__


def renamed_methods(cls: type, base: type, renames: dict[str, str]) -> None:
    """For a plugin class ``cls`` (a subclass of ``base``) that defines a method under its old name and not
    under the new one (``renames`` maps old to new): warn, and let the new name call it."""
    for old, new in renames.items():
        if old in vars(cls) and new not in vars(cls):
            warnings.warn(
                f"{cls.__qualname__}.{old} is deprecated; rename it to {new} ({base.__name__}.{new})",
                DeprecationWarning,
                stacklevel=3,
            )
            setattr(cls, new, vars(cls)[old])
