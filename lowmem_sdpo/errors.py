"""User-facing errors: one line naming the file/row/field and what was expected.

The CLI prints `error: <message>` and exits with code 2 (no traceback unless --debug).
"""

from __future__ import annotations


class InputError(Exception):
    """Bad input from the user (file, row, column, flag). Exit code 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # Keep it to one line: the message is what the user reads.
        super().__init__(" ".join(str(message).split("\n")))
