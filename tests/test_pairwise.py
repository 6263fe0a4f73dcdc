"""Pairwise win rates with an LM judge and its validity check (:mod:`attrctl.eval.pairwise`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attrctl.eval.pairwise import (
    VALIDITY_MIN,
    LMJudge,
    Pair,
    judge_pairs,
    prefer_a,
    shuffled,
    validity,
)

REAL = [
    "and the rain kept falling on the quiet town all night long",
    "so she opened the window and listened to the birds outside",
    "but nobody in the room knew the answer to his question",
    "while the children played happily in the park near the river",
]


def pairs(a: list[str], b: list[str]) -> list[Pair]:
    return [Pair(i, f"prompt {i}", x, y) for i, (x, y) in enumerate(zip(a, b, strict=True))]


class ReadsOrder:
    """A judge that knows real text: it prefers whichever shown text is one of REAL (or, given
    two of them, the one listed first in ``better``)."""

    def __init__(self, better=REAL):
        self.rank = {t: i for i, t in enumerate(better)}

    def prob_first(self, ps):
        def score(t):
            return -self.rank.get(t, 10_000)

        return np.asarray([0.9 if score(p.a) > score(p.b) else 0.1 for p in ps])


class FirstShown:
    """A judge with nothing but position bias: always answers A."""

    def prob_first(self, ps):
        return np.ones(len(ps))


def test_shuffled_keeps_the_words_and_changes_the_order():
    for j, text in enumerate(REAL):
        out = shuffled(text, seed=j)
        assert out != text and sorted(out.split()) == sorted(text.split())
    assert shuffled("one", 0) == "one"


def test_a_judge_that_reads_passes_the_check_and_its_win_rate_is_right():
    result = judge_pairs(ReadsOrder(), pairs(REAL, [shuffled(t, 9) for t in REAL]), seed=0)
    assert result["validity"]["usable"] and result["validity"]["rate"]["value"] == 1.0
    assert result["win_rate_a"]["value"] == 1.0 and result["usable"]
    # B better on two prompts, A on two: 50%
    better = [REAL[0], REAL[2], REAL[1], REAL[3]]
    judge = ReadsOrder(better)
    r = judge_pairs(judge, pairs([REAL[0], REAL[1], REAL[2], REAL[3]],
                                 [REAL[2], REAL[0], REAL[3], REAL[1]]), seed=0)  # fmt: skip
    assert r["win_rate_a"]["value"] == 0.5 and r["ties"] == 0.0


def test_position_bias_cancels_and_a_blind_judge_is_unusable():
    pref, first = prefer_a(FirstShown(), pairs(REAL, REAL[::-1]))
    assert np.all(pref == 0.5) and first == 1.0  # both orders: no pair is won
    check = validity(FirstShown(), pairs(REAL, REAL), seed=0)
    assert not check["usable"] and check["rate"]["value"] == 0.5
    assert check["position_bias"] == 1.0


def test_the_tiny_random_judge_cannot_tell_real_from_shuffled():
    """A random 2-layer model is no judge: the check must catch it, not report its win rates."""
    from attrctl.models import load_model

    loaded = load_model("tiny-random")
    judge = LMJudge(loaded.model, loaded.tokenizer)
    texts = REAL * 3
    p = judge.prob_first(pairs(texts, [shuffled(t, 1) for t in texts]))
    assert p.shape == (len(texts),) and np.all((p > 0) & (p < 1))
    check = validity(judge, pairs(texts, texts), seed=0)
    assert check["pairs"] == len(texts)
    assert not check["usable"], check  # at or near chance, or its interval reaches it
    assert check["rate"]["value"] < VALIDITY_MIN or check["rate"]["ci"][0] <= 0.5


def test_cli_marks_an_unusable_judge_and_writes_json(run_cli, tmp_path):
    (tmp_path / "p.txt").write_text("You are such a\nThe weather today is\nI think that\n")
    out = tmp_path / "pw.json"
    code, text, err = run_cli("pairwise", "tiny-random", "tiny-random", "--judge", "tiny-random",
                              "--prompts", tmp_path / "p.txt", "-k", "2", "--max-new-tokens",
                              "6", "--out", out)  # fmt: skip
    assert code == 3, err
    assert "UNUSABLE" in text
    result = json.loads(out.read_text())
    assert result["usable"] is False and result["pairs"] == 6 and result["prompts"] == 3
    assert result["ties"] == 1.0  # the same model with the same seeds: identical pairs


def test_cli_refuses_a_bad_target(run_cli, tmp_path):
    code, _, err = run_cli("pairwise", str(tmp_path / "nope"), "tiny-random")
    assert code == 2 and "Traceback" not in err


def test_a_tokenizer_that_cannot_tell_the_answers_apart_is_refused():
    from attrctl.errors import AttrctlError

    class Tok:
        def __call__(self, s, add_special_tokens=False):
            return {"input_ids": [7]}

    with pytest.raises(AttrctlError, match="cannot tell"):
        LMJudge(object(), Tok())
