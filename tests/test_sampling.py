"""The sampler's nucleus (top-p) step: the partial top-k search gives what a full sort gives."""

from __future__ import annotations

import pytest
import torch

from attrctl import sampling


def _reference(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Top-p by sorting the whole row (the definition)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p >= top_p
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(drop, 0.0))


def _rows(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    peaked = torch.randn(3, vocab, generator=g) * 8  # nucleus of a few tokens
    spread = torch.randn(3, vocab, generator=g) * 0.5  # nucleus of most of the vocabulary
    one_hot = torch.full((1, vocab), -1e4)
    one_hot[0, 7] = 0.0  # all the mass on one token
    return torch.cat([peaked, spread, one_hot])


@pytest.mark.parametrize("vocab", [50, 1024, 5000])
@pytest.mark.parametrize("top_p", [0.1, 0.9, 0.999])
def test_nucleus_matches_a_full_sort(vocab, top_p, monkeypatch):
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", 64)  # small, so wide rows fall back
    logits = _rows(vocab)
    got = sampling._next_token_probs(logits, 1.0, top_p)
    want = _reference(logits, 1.0, top_p)
    # the kept set is exactly the same, and so is every kept probability
    assert torch.equal(got > 0, want > 0)
    assert torch.equal(got, want)
    kept = (got > 0).sum(-1)
    if vocab > 64 and top_p >= 0.9:
        assert int(kept.max()) > 64  # some rows really needed the full-sort fallback
    assert int(kept.min()) >= 1  # the first token always stays


@pytest.mark.parametrize("top_p", [0.1, 0.9])
def test_a_flat_row_keeps_the_nucleus_size_of_a_full_sort(top_p, monkeypatch):
    # every token ties: which ones are kept is the sort's choice, how many and their mass is not
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", 64)
    logits = torch.zeros(2, 5000)
    got, want = sampling._next_token_probs(logits, 1.0, top_p), _reference(logits, 1.0, top_p)
    assert torch.equal((got > 0).sum(-1), (want > 0).sum(-1))
    kept = int((got > 0).sum(-1)[0])
    assert kept > 64 and abs(kept - top_p * 5000) <= 1  # wider than the 64 candidates
    assert torch.allclose(got.sum(-1), want.sum(-1))


def test_plain_sampling_is_the_softmax():
    logits = _rows(300)
    got = sampling._next_token_probs(logits, 0.7, 1.0)
    assert torch.equal(got, torch.softmax(logits / 0.7, dim=-1))
