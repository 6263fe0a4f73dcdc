"""``regex``: flags texts that match any of a set of patterns (e.g. e-mail addresses, phones).

The violation probability is 1 when any pattern matches and 0 otherwise; :meth:`RegexOracle.find`
says which named patterns matched, for reports.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from attrctl.oracles.base import Oracle
from attrctl.oracles.specs import RegexSpec


class RegexOracle(Oracle):
    kind = "regex"
    Spec = RegexSpec
    batch_size = 4096

    def __init__(self, spec: RegexSpec, base_dir: Path | None = None):
        super().__init__(spec, base_dir)
        flags = 0 if spec.case_sensitive else re.IGNORECASE
        named = (
            spec.patterns
            if isinstance(spec.patterns, dict)
            else {f"pattern{i}": p for i, p in enumerate(spec.patterns)}
        )
        self._patterns = {name: re.compile(p, flags) for name, p in named.items()}

    def find(self, text: str) -> list[str]:
        """Names of the patterns that match ``text``."""
        return [name for name, pat in self._patterns.items() if pat.search(text)]

    def score_batch(self, texts: Sequence[str]) -> np.ndarray:
        return np.array(
            [1.0 if any(p.search(t) for p in self._patterns.values()) else 0.0 for t in texts]
        )
