"""User-facing errors.

Every mistake a user can make (a bad budget, a missing file, a checkpoint of the wrong family) raises
`DuetError` with a one-line message. The CLI prints that line and exits with code 2; the Python API lets it
propagate. Anything else that escapes is a bug in duet-export.
"""

from __future__ import annotations

__all__ = ["DuetError", "one_line"]


class DuetError(ValueError):
    """A problem with the user's input, reported as one line."""

    exit_code = 2


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (library messages often span several), cut at `limit`."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    text = text or error.__class__.__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
