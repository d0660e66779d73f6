"""Errors that reach the user as one clear line and a meaningful exit code."""

from __future__ import annotations

import string
from collections.abc import Callable

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class DpError(Exception):
    """A failure the user can act on. ``exit_code`` 2 means bad input or usage, 1 a runtime failure."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class BadInput(DpError):
    """The user gave something we cannot use: a missing path, a corrupt file, an out-of-range value."""

    exit_code = EXIT_USAGE


class UnsafeFile(BadInput):
    """A file that could only be read by running code from it (an arbitrary pickle)."""


class BadSetting(BadInput):
    """A setting the library cannot use, named by its settings field, never by a command-line flag.

    ``field`` is the setting at fault (a settings dataclass field such as ``threshold``); ``template`` is
    the message with every setting it mentions in braces (``"{threshold} must be in [0, 1]"``) and no
    user values, so a front end can name settings its own way (the CLI shows flags, see
    ``dpcli.cli.errors``); ``got``, when given, is the value given, appended as ", got VALUE".
    ``str()`` names the fields: ``threshold must be in [0, 1], got 1.5``. User values inside the message
    (paths, patterns) go in as keyword ``values`` and are shown as given: ``BadSetting("ignore",
    "{ignore} {pattern} matches no module", pattern="'x'")``.
    """

    def __init__(self, field: str, template: str, got: object = None, **values: object):
        self.field, self.template, self.got, self.values = field, template, got, values
        super().__init__(self.render(str))

    def render(self, name: Callable[[str], str]) -> str:
        """The message with each setting in braces shown as ``name(setting)``."""
        keys = {key for _, key, _, _ in string.Formatter().parse(self.template) if key}
        text = self.template.format_map(
            {key: self.values[key] if key in self.values else name(key) for key in keys}
        )
        return text if self.got is None else f"{text}, got {self.got}"
