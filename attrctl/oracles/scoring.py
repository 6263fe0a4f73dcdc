"""Score texts with one oracle and measure its throughput (behind ``attrctl oracle score``).

:func:`score_texts` builds an oracle from a kind plus parameters (or a spec, or an oracle) and
scores a list of texts in the oracle's batches, timing loading and scoring separately so the
reported throughput (texts/s) is the scoring rate alone — the number that matters when the oracle
labels every sampled continuation during training.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

from attrctl.errors import AttrctlError
from attrctl.oracles import build_oracle, oracle_kinds, validate_oracle_spec
from attrctl.oracles.base import Oracle
from attrctl.strict_yaml import YAMLProblem, load_yaml

__all__ = ["ScoreResult", "oracle_spec", "parse_params", "read_texts", "score_texts"]


@dataclass(frozen=True)
class ScoreResult:
    """Scores of a list of texts and how long they took.

    Attributes:
        kind: the oracle kind.
        texts: the scored texts.
        scores: float64 ``[len(texts)]`` violation probabilities in [0, 1].
        load_seconds: building the oracle (imports, reading model files).
        score_seconds: scoring all texts, in the oracle's batches.
    """

    kind: str
    texts: list[str]
    scores: np.ndarray
    load_seconds: float
    score_seconds: float

    @property
    def texts_per_second(self) -> float:
        return len(self.texts) / self.score_seconds if self.score_seconds > 0 else math.inf

    def records(self) -> list[dict[str, Any]]:
        """``[{"text": ..., "score": ...}, ...]`` (JSON-ready)."""
        return [
            {"text": t, "score": float(s)} for t, s in zip(self.texts, self.scores, strict=True)
        ]

    def table(self, width: int = 72) -> str:
        """A readable table: score, then the text on one line, truncated to ``width`` characters."""
        lines = [f"{'score':>7}  text"]
        for text, score in zip(self.texts, self.scores, strict=True):
            shown = text.encode("unicode_escape").decode("ascii") if _has_control(text) else text
            if len(shown) > width:
                shown = shown[: width - 1] + "…"
            lines.append(f"{score:7.4f}  {shown}")
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: how many texts, how fast, and the load time."""
        return (
            f"{self.kind}: scored {len(self.texts)} texts in {self.score_seconds:.3f} s "
            f"({self.texts_per_second:,.0f} texts/s); loading took {self.load_seconds:.2f} s"
        )


def _has_control(text: str) -> bool:
    return any(not c.isprintable() for c in text)


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """``["key=value", ...]`` → ``{key: value}``; each value is read as YAML (``2``, ``[a, b]``)."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise AttrctlError(f"--param {item!r}: expected KEY=VALUE, e.g. reduce=mean")
        try:
            params[key] = load_yaml(raw)[0] if raw.strip() else None
        except YAMLProblem as err:
            raise AttrctlError(f"--param {item!r}: the value is not valid YAML: {err}") from None
    return params


def oracle_spec(
    kind: str, params: Mapping[str, Any] | None = None, base_dir: Path | None = None
) -> BaseModel:
    """Validate ``{"kind": kind, **params}``; bad input is an :class:`AttrctlError` naming fields."""
    if kind not in oracle_kinds():
        raise AttrctlError(
            f"unknown oracle kind {kind!r}; known kinds: {', '.join(oracle_kinds())}"
        )
    params = dict(params or {})
    if "kind" in params:
        raise AttrctlError("give the kind with --oracle, not as a parameter")
    try:
        return validate_oracle_spec({"kind": kind, **params}, base_dir=base_dir)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = [str(p) for p in e["loc"]]
            if loc and loc[0] in (kind, "plugin"):  # drop the discriminated union's tag
                loc = loc[1:]
            problems.append(f"  - {'.'.join(loc) or '(spec)'}: {e['msg']}")
        raise AttrctlError(f"oracle {kind}: invalid parameters\n" + "\n".join(problems)) from None


def read_texts(path: str | Path) -> list[str]:
    """One text per line of a UTF-8 file (``-``: standard input); blank lines are skipped."""
    if str(path) == "-":
        content, name = sys.stdin.read(), "<stdin>"
    else:
        name = str(path)
        try:
            content = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise AttrctlError(f"{name}: no such file") from None
        except UnicodeDecodeError as err:
            raise AttrctlError(
                f"{name}: not UTF-8 text ({err.reason} at byte {err.start})"
            ) from None
        except OSError as err:
            raise AttrctlError(f"{name}: cannot read: {err.strerror}") from None
    texts = [line for line in content.splitlines() if line.strip()]
    if not texts:
        raise AttrctlError(f"{name}: contains no texts (expected one text per line)")
    return texts


def score_texts(
    oracle: str | BaseModel | Mapping[str, Any] | Oracle,
    texts: Sequence[str],
    params: Mapping[str, Any] | None = None,
    base_dir: Path | None = None,
) -> ScoreResult:
    """Score ``texts`` with an oracle and time it.

    Args:
        oracle: a kind (``"jigsaw_bilstm"``, with ``params``), a spec or spec dict, or a built
            :class:`Oracle` (then ``load_seconds`` is 0).
        texts: the texts to score.
        params: the oracle's parameters when ``oracle`` is a kind, e.g. ``{"labels": ["threat"]}``.
        base_dir: the folder relative paths in the parameters resolve against.

    Returns:
        A :class:`ScoreResult` with float64 scores of shape ``[len(texts)]``.
    """
    if isinstance(texts, str):
        raise TypeError("score_texts takes a sequence of texts, not a single string")
    texts = list(texts)
    start = time.perf_counter()
    if isinstance(oracle, str):
        oracle = build_oracle(oracle_spec(oracle, params, base_dir), base_dir)
    elif not isinstance(oracle, Oracle):
        if params:
            raise TypeError("params are only used with an oracle kind, not a spec or an oracle")
        oracle = build_oracle(oracle, base_dir)  # type: ignore[arg-type]
    loaded = time.perf_counter()
    scores = oracle.score(texts)  # [N]
    done = time.perf_counter()
    return ScoreResult(oracle.kind, texts, scores, loaded - start, done - loaded)
