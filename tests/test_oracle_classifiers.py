"""The classifier oracles: profanity_check, jigsaw_bilstm (PyTorch port) and vader.

Run against the real installed packages. The port test compares against outputs of the ORIGINAL
Keras model recorded by tests/fixtures/make_jigsaw_reference.py (see the fixture's "note").

Known limitation, measured here and stated in docs/models-data.md: both toxicity classifiers catch
explicit toxicity (slurs, insults, profanity) and miss implicit hate — a stereotype or a
"go back to your country" phrased without offensive words scores low. The characterisation test
at the end pins that contrast so the documented claim stays true.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from attrctl.errors import AssetError
from attrctl.oracles import build_oracle, oracle_class
from attrctl.oracles.specs import JIGSAW_LABELS

FIXTURE = Path(__file__).parent / "fixtures" / "jigsaw_reference.json"

EXPLICIT = [
    "You are a stupid idiot and everyone hates you.",
    "Fuck you, you worthless piece of shit.",
    "Shut up, you ignorant moron.",
    "You're an IDIOT!!!",
]
BENIGN = [
    "Thank you for your help with the article, I really appreciate it.",
    "The weather is nice today and I am going for a walk in the park.",
    "I think the second paragraph needs a better citation.",
    "What a lovely day, thanks so much!",
]
# No offensive word in either; a human reads both as hateful.
IMPLICIT_HATE = [
    "Women are too emotional to be trusted with important decisions.",
    "Go back to your country, nobody wants your kind here.",
]


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def jigsaw():
    return build_oracle({"kind": "jigsaw_bilstm"})


@pytest.fixture(scope="module")
def profanity():
    return build_oracle({"kind": "profanity_check"})


# ------------------------------------------------------------------------- jigsaw: port vs Keras
def test_reference_fixture_is_meaningful(reference):
    assert reference["labels"] == list(JIGSAW_LABELS)
    assert "make_jigsaw_reference.py" in reference["note"]
    assert len(reference["cases"]) >= 20
    probs = np.array([c["probs"] for c in reference["cases"]])  # [25, 6]
    # The comparison below is only worth something if the cases span the output range.
    assert probs[:, 0].max() > 0.99 and probs[:, 0].min() < 0.01
    assert any(len(c["ids"]) > 100 for c in reference["cases"])  # exercises pre-truncation
    assert any(c["text"] == "" for c in reference["cases"])


def test_tokenizer_matches_keras_texts_to_sequences(jigsaw, reference):
    for case in reference["cases"]:
        assert jigsaw.tokenizer.ids(case["text"]) == case["ids"], case["text"]


def test_port_matches_keras_on_all_six_labels(jigsaw, reference):
    texts = [c["text"] for c in reference["cases"]]
    expected = np.array([c["probs"] for c in reference["cases"]])  # [25, 6]
    got = jigsaw.label_probs(texts)  # [25, 6]
    assert got.shape == expected.shape
    # Both sides compute in float32 with different op order; a correct port is ~1e-7 off (measured
    # 1.2e-7), a wrong gate order, bias or activation is off by > 1e-2.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_port_is_batch_invariant(jigsaw, reference):
    texts = [c["text"] for c in reference["cases"]]
    together = jigsaw.label_probs(texts)
    alone = np.concatenate([jigsaw.label_probs([t]) for t in texts])
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-6)


def test_encode_pre_pads_and_pre_truncates(jigsaw):
    tok = jigsaw.tokenizer
    long = " ".join(["idiot"] + ["the"] * 150)
    ids = tok.encode(["you idiot", long, ""])  # [3, 100]
    assert ids.shape == (3, 100)
    assert ids[0, :98].eq(0).all() and ids[0, 98:].tolist() == tok.ids("you idiot")
    assert ids[1].tolist() == [tok.vocab["the"]] * 100  # "idiot" at the start was cut off
    assert ids[2].eq(0).all()


def test_vocabulary_drops_ids_at_or_above_num_words(jigsaw):
    ids = list(jigsaw.tokenizer.vocab.values())
    assert max(ids) == 19999 and len(ids) == 19999  # Embedding has 20000 rows; 0 is padding


@pytest.mark.parametrize(
    ("labels", "reduce"),
    [(["toxic"], "max"), (["threat", "insult"], "max"), (["obscene", "identity_hate"], "mean")],
)
def test_selected_labels_and_reduction(jigsaw, labels, reduce):
    texts = [*EXPLICIT, *BENIGN, "I will kill you and your whole family."]
    oracle = build_oracle({"kind": "jigsaw_bilstm", "labels": labels, "reduce": reduce})
    cols = jigsaw.label_probs(texts)[:, [JIGSAW_LABELS.index(lab) for lab in labels]]
    expected = cols.max(axis=1) if reduce == "max" else cols.mean(axis=1)
    np.testing.assert_allclose(oracle.score(texts), expected, rtol=0, atol=1e-7)


def test_jigsaw_separates_explicit_abuse_from_benign(jigsaw):
    assert (jigsaw.score(EXPLICIT) > 0.9).all()
    assert (jigsaw.score(BENIGN) < 0.2).all()
    assert jigsaw.score([]).shape == (0,)


def test_jigsaw_restores_torch_threads(jigsaw):
    import torch

    before = torch.get_num_threads()
    jigsaw.score(["x"])
    assert torch.get_num_threads() == before


def test_jigsaw_missing_package_names_the_install(monkeypatch):
    from attrctl.oracles import jigsaw as mod

    monkeypatch.setattr(mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        AssetError, match=r"pip install --no-deps toxic-comment-classifier==0\.3\.0"
    ):
        mod.package_dir()


# -------------------------------------------------------------------- the allow-listing unpickler
KERAS_MODULES = [
    "keras",
    "keras.src",
    "keras.src.legacy",
    "keras.src.legacy.preprocessing",
    "keras.src.legacy.preprocessing.text",
]


def _keras_tokenizer_pickle(monkeypatch, state: dict) -> bytes:
    """Pickle ``state`` as a Keras ``Tokenizer`` would be pickled, without Keras installed."""
    for name in KERAS_MODULES:  # a fake module tree so pickle can name the class
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    cls = type("Tokenizer", (), {"__module__": KERAS_MODULES[-1]})
    sys.modules[KERAS_MODULES[-1]].Tokenizer = cls
    obj = cls()
    obj.__dict__.update(state)
    return pickle.dumps(obj, protocol=5)


def _state(**overrides) -> dict:
    word_index = {"the": 1, "you": 2, "idiot": 3, "rare": 7}
    return {
        "word_counts": collections.OrderedDict((w, 1) for w in word_index),
        "word_docs": collections.defaultdict(int, {w: 1 for w in word_index}),
        "filters": '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\t\n',
        "split": " ",
        "lower": True,
        "num_words": 5,
        "oov_token": None,
        "char_level": False,
        "analyzer": None,
        "word_index": word_index,
        **overrides,
    }


def test_unpickler_reads_a_keras_tokenizer_as_plain_state(monkeypatch, tmp_path):
    from attrctl.oracles.jigsaw import load_tokenizer

    path = tmp_path / "tok.pickle"
    path.write_bytes(_keras_tokenizer_pickle(monkeypatch, _state()))
    monkeypatch.undo()  # Keras' "module" is gone again: loading must not need it
    tok = load_tokenizer(path)
    assert tok.ids("You, IDIOT! rare unknown") == [2, 3]  # "rare" has id 7 ≥ num_words 5


def test_unpickler_maps_words_beyond_num_words_to_the_oov_token(monkeypatch, tmp_path):
    from attrctl.oracles.jigsaw import load_tokenizer

    state = _state(oov_token="<oov>", word_index={"<oov>": 1, "you": 2, "idiot": 3, "rare": 7})
    path = tmp_path / "tok.pickle"
    path.write_bytes(_keras_tokenizer_pickle(monkeypatch, state))
    assert load_tokenizer(path).ids("you rare unknown idiot") == [2, 1, 1, 3]


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless if it ran; the unpickler must refuse to resolve it


@pytest.mark.parametrize(
    "payload", [_Evil(), {"x": _Evil()}, [eval]], ids=["reduce", "nested", "builtin"]
)
def test_unpickler_refuses_everything_else(tmp_path, payload):
    from attrctl.oracles.jigsaw import load_tokenizer

    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(AssetError, match="refusing to load"):
        load_tokenizer(path)


def test_unpickler_rejects_a_pickle_that_is_not_a_tokenizer(tmp_path):
    from attrctl.oracles.jigsaw import load_tokenizer

    path = tmp_path / "dict.pickle"
    path.write_bytes(pickle.dumps(collections.OrderedDict(a=1)))
    with pytest.raises(AssetError, match="expected a Keras Tokenizer"):
        load_tokenizer(path)


# --------------------------------------------------------------------------------- profanity_check
def test_profanity_separates_explicit_abuse_from_benign(profanity):
    assert (profanity.score(EXPLICIT) > 0.9).all()
    assert (profanity.score(BENIGN) < 0.2).all()
    assert profanity.score([]).shape == (0,)  # the SVM itself rejects an empty batch


def test_profanity_batches_agree_with_one_call(profanity):
    texts = EXPLICIT + BENIGN
    expected = profanity.score(texts)
    small = oracle_class("profanity_check")
    monkey = type("Small", (small,), {"batch_size": 3})(profanity.spec)
    np.testing.assert_allclose(monkey.score(texts), expected, rtol=0, atol=0)


def test_profanity_missing_package_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "profanity_check", None)  # import now raises ImportError
    with pytest.raises(AssetError, match=r"pip install alt-profanity-check==1\.9\.1"):
        build_oracle({"kind": "profanity_check"})


# ------------------------------------------------------------------------------------------- vader
def test_vader_measures():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    texts = ["I love this, it is wonderful!", "I hate this, it is awful.", "The box is brown.", ""]
    raw = [SentimentIntensityAnalyzer().polarity_scores(t) for t in texts]
    compound = build_oracle({"kind": "vader"}).score(texts)
    neg = build_oracle({"kind": "vader", "measure": "neg"}).score(texts)
    np.testing.assert_allclose(compound, [max(0.0, -r["compound"]) for r in raw], atol=0)
    np.testing.assert_allclose(neg, [r["neg"] for r in raw], atol=0)
    assert compound[0] == 0.0 and compound[1] > 0.5 and compound[2] == 0.0  # positive/neutral: 0


def test_vader_missing_package_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)
    with pytest.raises(AssetError, match="pip install vaderSentiment"):
        build_oracle({"kind": "vader"})


# ------------------------------------------------------------------------ a documented limitation
def test_both_classifiers_miss_implicit_hate(jigsaw, profanity):
    """Characterisation, not a goal: explicit abuse scores > 0.9, implicit hate < 0.5.

    If this fails because a classifier now catches implicit hate, that is an improvement:
    update docs/models-data.md's limitation note and this test.
    """
    for oracle in (jigsaw, profanity):
        assert (oracle.score(EXPLICIT) > 0.9).all()
        assert (oracle.score(IMPLICIT_HATE) < 0.5).all(), oracle.kind
