"""The exception types for mistakes and faults a user can fix, and how they are printed.

Anything raised as :class:`UserError` is reported by the entry points as a single line
(``nt-dist: error: <message>``) with exit code 2 and no traceback; :class:`RunError` (a fault
during a run: a full disk, a NaN loss) likewise, with exit code 1. Everything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

EXIT_USER_ERROR = 2
EXIT_RUN_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed on SIGTERM/SIGUSR1; cluster/slurm requeues on it
MAX_LINE = 500  # no error line is longer, whatever the input (a YAML value can be megabytes)


def one_line(message: str) -> str:
    """``message`` as one line of at most ``MAX_LINE`` characters.

    An exception re-raised by a DataLoader worker carries the worker's whole traceback
    ("Caught UserError in DataLoader worker process 0. Original Traceback ..."): its last line
    is the message that was raised there, and that is what the user needs.
    """
    text = str(message)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and "Error" in last.split(": ", 1)[0] else last
    text = " ".join(text.split())
    return text if len(text) <= MAX_LINE else text[:MAX_LINE - 3] + "..."


class UserError(Exception):
    """A mistake in a recipe, a path or a file that the user can fix.

    The message must be one line that names the file and the key or path involved.
    """

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class RunError(Exception):
    """A fault that ended a run (no space left on device, a non-finite loss): one line, exit 1."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class Preempted(Exception):
    """The loop stopped at a step boundary on a signal; ``interrupted``: it was SIGINT (Ctrl-C)."""

    def __init__(self, interrupted: bool = False) -> None:
        super().__init__("interrupted" if interrupted else "preempted")
        self.interrupted = interrupted


def say(line: str) -> None:
    """Write one line to stderr in a single ``write``, whatever the stream's buffering: lines of
    several processes sharing one pipe never mix (POSIX keeps writes of up to PIPE_BUF = 4096
    bytes to a pipe whole, and a line is at most ``MAX_LINE`` characters)."""
    sys.stderr.flush()
    data = (one_line(line) + "\n").encode("utf-8", "replace")
    try:
        os.write(sys.stderr.fileno(), data)
    except (OSError, ValueError, AttributeError):  # stderr replaced (pytest capture) or closed
        sys.stderr.write(data.decode("utf-8"))
        sys.stderr.flush()


def error(message: str) -> None:
    say(f"nt-dist: error: {message}")


def warn(message: str) -> None:
    """One line on stderr, ``nt-dist: warning: ...`` (no file/line noise of ``warnings``)."""
    say(f"nt-dist: warning: {message}")
