"""``lexicon``: flags texts containing listed words or phrases.

Matching is on word boundaries (``ass`` does not match ``class``) and case-insensitive by default.
A text's violation probability is the noisy-OR of the weights of the distinct entries it
contains, ``1 - Π_w (1 - weight_w)``: one weight-1 word is a certain violation, two weight-0.5
words give 0.75.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from attrctl.errors import AttrctlError
from attrctl.oracles.base import Oracle
from attrctl.oracles.specs import LexiconSpec


def read_word_list(path: Path) -> dict[str, float]:
    """Read a word-list file: ``word`` or ``word<TAB>weight`` per line, ``#`` comments."""
    entries: dict[str, float] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise AttrctlError(f"{path}: cannot read word list: {err.strerror}") from None
    for lineno, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        word, _, weight = line.partition("\t")
        try:
            value = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise AttrctlError(
                f"{path}:{lineno}: weight {weight.strip()!r} is not a number"
            ) from None
        if not 0.0 < value <= 1.0:
            raise AttrctlError(f"{path}:{lineno}: weight {value} must be in (0, 1]")
        entries[word.strip()] = value
    if not entries:
        raise AttrctlError(f"{path}: the word list is empty")
    return entries


class LexiconOracle(Oracle):
    kind = "lexicon"
    Spec = LexiconSpec
    batch_size = 4096

    @classmethod
    def input_files(cls, spec: LexiconSpec) -> dict[str, Path]:
        return {"path": Path(spec.path)} if spec.path is not None else {}

    def __init__(self, spec: LexiconSpec, base_dir: Path | None = None):
        super().__init__(spec, base_dir)
        if spec.path is not None:
            entries = read_word_list(Path(spec.path))
        elif isinstance(spec.words, dict):
            entries = dict(spec.words)
        else:
            entries = dict.fromkeys(spec.words or (), 1.0)
        flags = 0 if spec.case_sensitive else re.IGNORECASE
        # Longest entries first so a phrase wins over a word it contains; \b only where the
        # entry starts/ends with a word character, so entries like "f*ck" still match.
        words = sorted(entries, key=len, reverse=True)
        alternatives = [
            (r"\b" if w[0].isalnum() or w[0] == "_" else "")
            + re.escape(w)
            + (r"\b" if w[-1].isalnum() or w[-1] == "_" else "")
            for w in words
        ]
        self._pattern = re.compile("|".join(alternatives), flags)
        key = (lambda w: w) if spec.case_sensitive else str.lower
        self._weights = {key(w): wt for w, wt in entries.items()}
        self._key = key

    def matches(self, text: str) -> set[str]:
        """The distinct lexicon entries found in ``text`` (normalised to the lexicon's case)."""
        return {self._key(m.group(0)) for m in self._pattern.finditer(text)}

    def score_batch(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros(len(texts))
        for i, text in enumerate(texts):
            keep = 1.0
            for word in self.matches(text):
                keep *= 1.0 - self._weights.get(word, 1.0)
            out[i] = 1.0 - keep
        return out
