"""The one exception type users see.

Anything the user can fix (a recipe key, a path, a column name) raises `LlmtuneError` with a message
that names the field or file, the value, and what would be valid. The CLI prints the message without a
traceback; the Python API lets it propagate like any other exception.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LlmtuneError(Exception):
    """A problem in the user's recipe, data or environment, explained in one paragraph."""


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean "x"?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return f' Did you mean "{close[0]}"?' if close else ""


class TrainingStopped(KeyboardInterrupt):
    """Training stopped on a signal (Ctrl-C, SIGTERM) after saving a resumable checkpoint.

    A KeyboardInterrupt, so that code which already treats Ctrl-C as "stop" keeps doing so; `exit_code` is what
    the command line exits with (130 after SIGINT, 143 after SIGTERM, the shell's 128 + signal convention).
    """

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code
