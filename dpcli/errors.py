"""Errors that reach the user as one clear line and a meaningful exit code."""

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
