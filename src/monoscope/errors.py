"""One exception type for every mistake a user can make.

The CLI prints its message without a traceback and exits with status 2, so the message must say what
was wrong *and* what would be right.
"""


class MonoscopeError(Exception):
    """A problem with the user's input or environment (bad name, wrong shape, empty data, ...)."""


class MonoscopeWarning(UserWarning):
    """Something the user should know that does not stop the work (a poor SAE fit, bad bytes replaced)."""


def warn(message: str) -> None:
    """Emit ``message`` as a MonoscopeWarning; the CLI prints it as one line ``monoscope: warning: …``."""
    import warnings

    warnings.warn(message, MonoscopeWarning, stacklevel=3)
