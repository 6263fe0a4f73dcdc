"""``profanity_check``: alt-profanity-check, a TF-IDF + calibrated linear SVM (the training oracle).

alt-profanity-check 1.9.1 (MIT) scores ~10,000 texts in ~0.1 s on one CPU core, cheap enough to
label every sampled continuation during training. Its violation score is the SVM's calibrated
probability that a text is offensive. It catches explicit profanity and insults; like the
judge, it misses implicit hate that uses no offensive words.

The package loads its scikit-learn model at import time (~1 s), so it is imported when the
oracle is built, never when attrctl is imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from attrctl.errors import AssetError
from attrctl.oracles.base import Oracle
from attrctl.oracles.specs import ProfanityCheckSpec

INSTALL_HINT = "pip install alt-profanity-check==1.9.1"


class ProfanityCheckOracle(Oracle):
    kind = "profanity_check"
    Spec = ProfanityCheckSpec
    batch_size = 4096
    distributions = ("alt-profanity-check",)

    def __init__(self, spec: ProfanityCheckSpec, base_dir: Path | None = None):
        super().__init__(spec, base_dir)
        try:
            from profanity_check import predict_prob
        except ImportError as err:
            raise AssetError(
                "the profanity_check oracle needs the alt-profanity-check package (it pins "
                f"scikit-learn==1.9.1 and joblib==1.6.0): {INSTALL_HINT} ({err})"
            ) from err
        self._predict_prob = predict_prob

    def score_batch(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:  # the vectorizer accepts an empty list, but the SVM does not
            return np.zeros(0)
        return np.asarray(self._predict_prob(list(texts)), dtype=np.float64)
