"""Parameter schemas of the built-in oracle kinds (data only: nothing here runs code).

The implementations live beside this file, one module per kind, and are imported only when an
oracle is built. Third-party kinds bring their own ``Spec`` through the ``attrctl.oracles``
entry-point group (see :mod:`attrctl.oracles`).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from attrctl.strict import InputPath, StrictModel


class LexiconSpec(StrictModel):
    """Flags texts that contain listed words or phrases (word-boundary, case-insensitive)."""

    kind: Literal["lexicon"] = "lexicon"
    words: list[str] | dict[str, float] | None = Field(
        None,
        description="Inline words/phrases; a mapping gives each a weight in (0, 1] (default 1). "
        "A text's violation is the noisy-OR of the weights of the words it contains.",
    )
    path: InputPath | None = Field(
        None,
        description="A word-list file: one word or phrase per line, optionally `word<TAB>weight`; "
        "'#' starts a comment. Relative to the policy file.",
    )
    case_sensitive: bool = Field(False, description="Match case exactly.")

    @field_validator("words")
    @classmethod
    def _check_words(cls, v):
        if v is None:
            return v
        items = v.items() if isinstance(v, dict) else ((w, 1.0) for w in v)
        for word, weight in items:
            if not word.strip():
                raise ValueError("words must not be empty strings")
            if not 0.0 < weight <= 1.0:
                raise ValueError(f"weight of {word!r} is {weight}; weights must be in (0, 1]")
        return v

    @model_validator(mode="after")
    def _one_source(self):
        if (self.words is None) == (self.path is None):
            raise ValueError("give exactly one of `words` (inline) or `path` (a word-list file)")
        return self


class RegexSpec(StrictModel):
    """Flags texts that match any of the patterns (Python `re` syntax)."""

    kind: Literal["regex"] = "regex"
    patterns: list[str] | dict[str, str] = Field(
        ...,
        description="Patterns to search for, as a list or as name → pattern (names show in reports).",
    )
    case_sensitive: bool = Field(False, description="Match case exactly.")

    @field_validator("patterns")
    @classmethod
    def _compile(cls, v):
        pats = v.values() if isinstance(v, dict) else v
        if not pats:
            raise ValueError("give at least one pattern")
        for pat in pats:
            try:
                re.compile(pat)
            except re.error as err:
                raise ValueError(
                    f"pattern {pat!r} is not a valid regular expression: {err}"
                ) from None
        return v


class ProfanityCheckSpec(StrictModel):
    """alt-profanity-check: TF-IDF + calibrated linear SVM (fast; the default training oracle)."""

    kind: Literal["profanity_check"] = "profanity_check"


JIGSAW_LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")


class JigsawBiLSTMSpec(StrictModel):
    """The Jigsaw 6-label BiLSTM of toxic-comment-classifier, ported to PyTorch (the judge)."""

    kind: Literal["jigsaw_bilstm"] = "jigsaw_bilstm"
    labels: list[
        Literal["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
    ] = Field(["toxic"], min_length=1, description="Labels whose probabilities make the score.")
    reduce: Literal["max", "mean"] = Field(
        "max", description="How the chosen labels' probabilities combine into one violation score."
    )


class VaderSpec(StrictModel):
    """vaderSentiment: violation = negative sentiment."""

    kind: Literal["vader"] = "vader"
    measure: Literal["compound", "neg"] = Field(
        "compound",
        description="`compound`: violation = max(0, -compound); `neg`: VADER's negative proportion.",
    )


BUILTIN_SPECS: dict[str, type[StrictModel]] = {
    "lexicon": LexiconSpec,
    "regex": RegexSpec,
    "profanity_check": ProfanityCheckSpec,
    "jigsaw_bilstm": JigsawBiLSTMSpec,
    "vader": VaderSpec,
}
