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

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel

from attrctl.errors import AttrctlError


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
    #: installed distributions that ship this oracle's model or lexicon; their versions go into
    #: :meth:`fingerprint` (a package's files do not change within a version).
    distributions: ClassVar[tuple[str, ...]] = ()

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

    @classmethod
    def input_files(cls, spec: BaseModel) -> dict[str, Path]:
        """Files named by ``spec`` whose contents make this oracle's scores (a word list, a model
        file), keyed by the spec field that names each. None by default."""
        return {}

    @classmethod
    def fingerprint(cls, spec: BaseModel) -> dict[str, Any]:
        """What determines this oracle's scores, as JSON-able data: the kind, the validated
        parameters, the sha256 of each of :meth:`input_files` (in place of its path, so moving
        the file keeps the fingerprint) and the versions of :attr:`distributions` (None: not
        installed). Data made under one fingerprint must not be extended under another: the
        scores would differ."""
        files = cls.input_files(spec)
        params = {k: v for k, v in spec.model_dump(mode="json").items() if k not in files}
        return {
            "kind": cls.kind,
            "params": params,
            "files": {field: _sha256(path) for field, path in sorted(files.items())},
            "packages": {dist: _version(dist) for dist in cls.distributions},
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as err:
        raise AttrctlError(f"{path}: cannot read oracle file: {err.strerror}") from None


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None
