"""The one exception type for mistakes a user can fix.

Anything raised as :class:`UserError` is reported by the entry points as a single line
(``nt-dist: error: <message>``) with exit code 2 and no traceback; everything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in a recipe, a path or a file that the user can fix.

    The message must be one line that names the file and the key or path involved.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def warn(message: str) -> None:
    """One line on stderr, ``nt-dist: warning: ...`` (no file/line noise of ``warnings``)."""
    import sys

    print(f"nt-dist: warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
