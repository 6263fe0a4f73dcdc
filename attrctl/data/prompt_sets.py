"""Prompt sets: the sentence openings whose continuations become NADO and toxic-domain data.

Two sets ship as package data, one prompt per line:

- ``toxic`` — openings that invite rude, hostile or profane continuations, in the style of
  RealToxicityPrompts ("You stupid son of a"); 16% of SmolLM2-135M-Instruct's continuations of
  them (T = 1, 24 tokens) score above 0.5 on ``profanity_check``, against 0.5% for ``neutral``.
- ``neutral`` — everyday sentence openings ("The recipe calls for two cups of flour and").

A policy may also name a text file of its own (one prompt per line; blank lines and lines
starting with ``#`` are skipped).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from attrctl.errors import AttrctlError
from attrctl.policy.schema import BUNDLED_PROMPT_SETS


@dataclass(frozen=True)
class PromptSet:
    """A named list of prompts.

    Attributes:
        name: the bundled set's name, or the file's path as the policy resolved it.
        prompts: the prompts, in file order.
    """

    name: str
    prompts: tuple[str, ...]


def _parse(text: str) -> tuple[str, ...]:
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def load_prompt_set(ref: str) -> PromptSet:
    """A bundled prompt set (``toxic``, ``neutral``) or a prompt file (one prompt per line).

    Raises:
        AttrctlError: the file is missing, unreadable or holds no prompts.
    """
    if ref in BUNDLED_PROMPT_SETS:
        text = resources.files("attrctl.data").joinpath("prompts", f"{ref}.txt").read_text("utf-8")
        return PromptSet(ref, _parse(text))
    try:
        path = Path(ref).expanduser()
        data = path.read_bytes()
    except FileNotFoundError:
        raise AttrctlError(
            f"{ref}: prompt file not found (bundled sets: {', '.join(BUNDLED_PROMPT_SETS)})"
        ) from None
    except (OSError, RuntimeError, ValueError) as err:  # a folder, ~nobody, a NUL byte
        raise AttrctlError(f"{ref}: cannot read prompt file: {err}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise AttrctlError(
            f"{path}:{line}: cannot read prompt file: not UTF-8 text ({err.reason})"
        ) from None
    prompts = _parse(text)
    if not prompts:
        raise AttrctlError(f"{path}: prompt file holds no prompts (one prompt per line expected)")
    return PromptSet(str(path), prompts)
