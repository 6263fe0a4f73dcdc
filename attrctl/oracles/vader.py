"""``vader``: VADER sentiment (vaderSentiment, lexicon bundled); violation = negative tone.

VADER is a rule-based sentiment model. Its ``compound`` score is a normalised sum of word
valences in [-1, 1]; ``neg`` is the proportion of the text that carries negative valence. The
``measure`` of :class:`~attrctl.oracles.specs.VaderSpec` picks the violation:

- ``compound``: ``max(0, -compound)`` — neutral and positive texts score 0, "I hate this, it is
  awful" scores ~0.8.
- ``neg``: VADER's negative proportion, in [0, 1]; mixed texts score between.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from attrctl.errors import AssetError
from attrctl.oracles.base import Oracle
from attrctl.oracles.specs import VaderSpec

INSTALL_HINT = "pip install vaderSentiment"


class VaderOracle(Oracle):
    kind = "vader"
    Spec = VaderSpec
    batch_size = 1024
    distributions = ("vaderSentiment",)

    def __init__(self, spec: VaderSpec, base_dir: Path | None = None):
        super().__init__(spec, base_dir)
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as err:
            raise AssetError(
                f"the vader oracle needs the vaderSentiment package: {INSTALL_HINT} ({err})"
            ) from err
        self._analyzer = SentimentIntensityAnalyzer()

    def score_batch(self, texts: Sequence[str]) -> np.ndarray:
        # VADER scores one text at a time; batching only bounds memory and fits Oracle.score.
        polarity = self._analyzer.polarity_scores
        if self.spec.measure == "compound":
            return np.array([max(0.0, -polarity(t)["compound"]) for t in texts], dtype=np.float64)
        return np.array([polarity(t)["neg"] for t in texts], dtype=np.float64)
