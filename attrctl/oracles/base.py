"""The oracle interface.

An oracle scores a batch of texts to **violation probabilities** in [0, 1]: 1 means "this text
violates the attribute" (toxic, contains PII, negative tone), 0 means it satisfies it. The NADO
label of a text for attribute k is derived from this score by the attribute's target
(hard: ``score < max_violation``; soft: ``1 - score``).

Every oracle kind — built in or registered by a third-party package under the entry-point group
``attrctl.oracles`` — is a subclass of :class:`Oracle` with a pydantic ``Spec`` describing its
parameters. Specs are data; building an oracle from a spec is the only place code runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import BaseModel


class Oracle(ABC):
    """Scores texts to violation probabilities in [0, 1].

    Subclasses set ``kind`` (the policy's ``kind:`` string) and ``Spec`` (a pydantic model whose
    ``kind`` field is ``Literal[kind]``), and implement :meth:`score_batch`.

    Args:
        spec: the validated spec of this oracle.
        base_dir: the folder relative paths in ``spec`` resolve against (the policy's folder).
    """

    kind: ClassVar[str]
    Spec: ClassVar[type[BaseModel]]
    #: texts scored per call of :meth:`score_batch`; subclasses tune it.
    batch_size: ClassVar[int] = 256

    def __init__(self, spec: BaseModel, base_dir: Path | None = None):
        self.spec = spec
        self.base_dir = base_dir or Path.cwd()

    @abstractmethod
    def score_batch(self, texts: Sequence[str]) -> np.ndarray:
        """Violation probabilities of one batch: float64 array of shape ``[len(texts)]``."""

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Violation probabilities of any number of texts, in batches: shape ``[len(texts)]``."""
        if isinstance(texts, str):
            raise TypeError("Oracle.score takes a sequence of texts, not a single string")
        out = np.empty(len(texts), dtype=np.float64)
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            scores = np.asarray(self.score_batch(chunk), dtype=np.float64)
            if scores.shape != (len(chunk),):
                raise RuntimeError(
                    f"oracle {self.kind!r} returned shape {scores.shape} for {len(chunk)} texts"
                )
            out[start : start + len(chunk)] = scores
        return np.clip(out, 0.0, 1.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"
