"""User-facing errors.

Every error a user can cause (a malformed policy, a missing file, a missing asset package) is an
:class:`AttrctlError`. The CLI prints its message and exits with code 2, with no traceback unless
``--debug`` is given. Library callers can catch it like any exception.
"""

from __future__ import annotations


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
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        n = len(self.problems)
        super().__init__(f"{source}: {n} problem{'s' if n != 1 else ''} in policy\n{lines}")


class AssetError(AttrctlError):
    """A bundled asset (model, classifier, corpus) is missing; the message says what to install."""


class Interrupted(AttrctlError):
    """A long job was stopped by SIGINT/SIGTERM after saving what it had (exit code 130)."""

    exit_code = 130
