"""User-facing errors.

Every error a user can cause (a malformed policy, a missing file, a missing asset package) is an
:class:`AttrctlError`. The CLI prints its message and exits with code 2, with no traceback unless
``--debug`` is given. Library callers can catch it like any exception.
"""

from __future__ import annotations


def printable(text: str) -> str:
    """``text`` with control characters (other than newline and tab) escaped, so that a message
    quoting user input cannot move the cursor, recolour the terminal or split a line."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() or c in "\n\t" else c.encode("unicode_escape").decode("ascii")
        for c in text
    )


class AttrctlError(Exception):
    """An error caused by the user's input or environment, with an actionable message."""

    exit_code: int = 2


class PolicyError(AttrctlError):
    """A policy file (or a ``--set`` override) is malformed or invalid.

    Args:
        source: the file (or ``--set`` override) the problem is in.
        problems: one line per problem, each naming the field path.
    """

    def __init__(self, source: str, problems: list[str]):
        self.source = printable(source)
        self.problems = [printable(p).replace("\n", "\\n") for p in problems]
        lines = "\n".join(f"  - {p}" for p in self.problems)
        n = len(self.problems)
        super().__init__(f"{source}: {n} problem{'s' if n != 1 else ''} in policy\n{lines}")


class AssetError(AttrctlError):
    """A bundled asset (model, classifier, corpus) is missing; the message says what to install."""


class Interrupted(AttrctlError):
    """A long job was stopped by SIGINT/SIGTERM after saving what it had (exit code 130)."""

    exit_code = 130


class WriteError(AttrctlError):
    """A write failed for a reason outside attrctl: a full disk, a file size limit, a read-only or
    permission-denied folder. Whatever was written before is intact; rerunning continues."""


class InUseError(AttrctlError):
    """Another live process holds the lock of a file or run directory attrctl would write."""
