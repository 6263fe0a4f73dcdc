"""The mixture: weighted, seeded draws over sources; packing with per-token domain ids."""

from __future__ import annotations

import collections
import itertools

import pytest
import torch

from attrctl.data.mixture import (
    IGNORE_INDEX,
    Mixture,
    MixtureSource,
    PackingCollator,
    build_mixture,
)
from attrctl.data.sources import Example
from attrctl.policy.schema import Policy


class CharTokenizer:
    """One token per character (id = code point + 2); eos = 0, pad = 1."""

    eos_token_id = 0
    pad_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) + 2 for c in text]}


def make_mixture(seed=0, weights=(3.0, 1.0)) -> Mixture:
    a = MixtureSource(
        "a", "toxic", weights[0] / sum(weights), tuple(Example(f"a{i}", "toxic") for i in range(5))
    )
    b = MixtureSource(
        "b",
        "general",
        weights[1] / sum(weights),
        tuple(Example(f"b{i}", "general") for i in range(40)),
    )
    return Mixture([a, b], ["toxic", "general"], [1.0, 0.1], seed=seed)


def test_draws_follow_weights_not_sizes():
    draws = list(itertools.islice(make_mixture().examples(), 4000))
    share = sum(e.domain == "toxic" for e in draws) / len(draws)
    # binomial std at p=0.75, n=4000 is 0.007: ±0.03 is > 4 sigma
    assert share == pytest.approx(0.75, abs=0.03)


def test_each_pass_covers_a_source_once_in_shuffled_order():
    toxic = [
        e.text for e in itertools.islice(make_mixture().examples(), 400) if e.domain == "toxic"
    ]
    first, second = toxic[:5], toxic[5:10]
    assert sorted(first) == sorted(second) == [f"a{i}" for i in range(5)]
    assert collections.Counter(toxic[: len(toxic) // 5 * 5]).most_common(1)[0][1] == len(toxic) // 5


def test_deterministic_for_a_seed_and_resumable_with_start():
    take = lambda m, start, n: [e.text for e in itertools.islice(m.examples(start), n)]  # noqa: E731
    full = take(make_mixture(seed=3), 0, 300)
    assert full == take(make_mixture(seed=3), 0, 300)
    assert take(make_mixture(seed=3), 123, 177) == full[123:]
    assert full != take(make_mixture(seed=4), 0, 300)


def test_collator_packs_examples_with_per_token_domains():
    coll = PackingCollator(CharTokenizer(), seq_len=4, domains=["toxic", "general"])
    batch = coll([Example("abc", "toxic"), Example("de", "general")])
    # stream: a b c <eos> d e <eos> <pad>  → rows [a b c eos] [d e eos pad]
    a = ord("a") + 2
    assert batch["input_ids"].tolist() == [[a, a + 1, a + 2, 0], [a + 3, a + 4, 0, 1]]
    assert batch["labels"].tolist() == [[a, a + 1, a + 2, 0], [a + 3, a + 4, 0, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["domain_ids"].tolist() == [[0, 0, 0, 0], [1, 1, 1, 1]]


def test_stream_gives_fixed_shapes_and_skips_batches():
    mix = make_mixture(seed=1)
    lam = mix.lambda_tensor()
    stream = mix.batches(CharTokenizer(), batch_size=3, seq_len=5)
    batches = list(itertools.islice(stream, 6))
    for b in batches:
        assert b["input_ids"].shape == b["domain_ids"].shape == (3, 5)
        assert (b["labels"] != IGNORE_INDEX).all()  # streams never pad
        assert lam[b["domain_ids"]].shape == (3, 5)  # per-token λ for the trainer
    # every token's domain id matches its text: 'a…' tokens come from toxic, 'b…' from general
    toks = torch.cat([b["input_ids"].flatten() for b in batches])
    doms = torch.cat([b["domain_ids"].flatten() for b in batches])
    assert set(doms[toks == ord("a") + 2].tolist()) == {0}
    assert set(doms[toks == ord("b") + 2].tolist()) == {1}
    resumed = list(itertools.islice(mix.batches(CharTokenizer(), 3, 5, start=4), 2))
    for x, y in zip(resumed, batches[4:], strict=True):
        assert torch.equal(x["input_ids"], y["input_ids"])
        assert torch.equal(x["domain_ids"], y["domain_ids"])


def test_build_mixture_from_a_policy(tmp_path):
    (tmp_path / "tox.txt").write_text("you idiot\n\nshut up")
    (tmp_path / "gen.txt").write_text("\n\n".join(f"line {i}" for i in range(10)))
    policy = Policy.model_validate(
        {
            "name": "t",
            "model": "tiny-random",
            "data": [
                {"kind": "file", "domain": "toxic", "path": "tox.txt", "weight": 1},
                {"kind": "file", "domain": "general", "path": "gen.txt", "weight": 3},
            ],
            "attributes": [{"name": "tox", "oracle": {"kind": "lexicon", "words": ["idiot"]}}],
            "regularization": {"lam": 0.5, "per_domain": {"toxic": 2.0}},
        },
        context={"base_dir": tmp_path},
    )
    mix = build_mixture(policy)
    assert mix.domains == ("toxic", "general")
    assert mix.lambdas == (2.0, 0.5)
    summary = {s["domain"]: s for s in mix.summary()}
    assert summary["toxic"]["examples"] == 2 and summary["general"]["examples"] == 10
    assert summary["general"]["probability"] == pytest.approx(0.75)
