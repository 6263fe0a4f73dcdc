"""The chunked loss's memory bound: at most ``C × V`` fp32 logits live at once (C = chunk rows of
:func:`attrctl.losses.chunked.pick_chunk_size`), never the ``[N, V]`` of the batch when N > C.

Observed, not assumed: a ``TorchDispatchMode`` sits below autograd and sees every tensor every op
returns during forward *and* backward (inside the custom autograd.Function too), and records the
size of the storage behind it. A chunked path that formed ``[N, V]`` (whole-batch logits, a full
head-logits tensor, a chunk size of N) would show a storage of ``N·V`` floats there.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from attrctl.losses import RegHead, chunked, regularized_lm_loss


def documented_rows(n: int, v: int, h: int, budget: int) -> int:
    """C as pick_chunk_size's docstring and docs/loss.md state it: the most rows, a multiple of 8
    and at least 8, whose three fp32 [C, V] buffers fit max(budget, V·H) bytes; at most n."""
    b = max(budget, v * h)
    return min(n, max(8, 8 * (b // (3 * 4 * v * 8))))


@pytest.mark.parametrize(
    ("n", "v", "h"),
    [
        (100_000, 49_152, 576),  # SmolLM2: C = 336, the figure docs/loss.md quotes
        (336, 49_152, 576),  # N = C: one chunk, the whole batch
        (200, 49_152, 576),  # N < C: one chunk of N rows
        (100_000, 128_256, 4_096),  # Llama-3: V·H (512 MiB) is the budget
        (100_000, 32_000, 4_096),
        (100_000, 5_000_000, 64),  # a huge V: the floor of 8 rows
        (5, 5_000_000, 64),
    ],
)
def test_chunk_rows_follow_the_documented_rule(n, v, h):
    c = chunked.pick_chunk_size(n, v, None, h)
    assert c == documented_rows(n, v, h, chunked.CHUNK_BUDGET_BYTES)
    if c < n:  # three [C, V] fp32 buffers fit the budget, unless the floor of 8 rows applies
        assert c == 8 or 3 * 4 * c * v <= max(chunked.CHUNK_BUDGET_BYTES, v * h)
    assert chunked.pick_chunk_size(n, v, 24, h) == min(24, n)  # an explicit chunk_size wins


class _Storages(TorchDispatchMode):
    """The storage size (bytes) behind every tensor an op returns, and the shapes of the
    tensors with ``v`` columns."""

    def __init__(self, v: int):
        super().__init__()
        self.v = v
        self.largest = 0
        self.vocab_shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
                if t.dim() == 2 and t.shape[1] == self.v:
                    self.vocab_shapes.add(tuple(t.shape))
        return out


def _inputs(n: int, h: int, v: int, heads: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / math.sqrt(h)).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)  # every row counted: N rows reach the pass
    reg = [
        RegHead(torch.randn(n, 8, generator=g), torch.randn(v, 8, generator=g) * 0.3,
                torch.randn(v, generator=g))
        for _ in range(heads)
    ]  # fmt: skip
    lam = torch.full((n,), 2.0)
    return hidden, weight, labels, reg, lam


# (N, H, V, budget): N > C in each; H ≪ C so the [V, H] weight gradient (a floor every fused-
# linear loss shares) stays below one [C, V] buffer and cannot hide a chunk-sized tensor.
CASES = {
    # the budget shrunk so that C = 48 rows at V 3,000: four chunks, the last one short
    "small budget": (170, 16, 3_000, 3 * 4 * 3_000 * 48),
    # the shipped budget at SmolLM2's vocabulary: C = 336, so N = 344 is two chunks (336 + 8)
    "SmolLM2 vocabulary": (344, 16, 49_152, None),
}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("heads", [0, 1])
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_loss_never_holds_the_batch_logits(case, heads, reduction, monkeypatch):
    n, h, v, budget = CASES[case]
    if budget is not None:
        monkeypatch.setattr(chunked, "CHUNK_BUDGET_BYTES", budget)
    c = chunked.pick_chunk_size(n, v, None, h)
    assert c == documented_rows(n, v, h, chunked.CHUNK_BUDGET_BYTES) and c < n
    hidden, weight, labels, reg, lam = _inputs(n, h, v, heads)
    with _Storages(v) as seen:
        out = regularized_lm_loss(
            hidden, weight, labels, reg, lam=lam, reduction=reduction, impl="chunked"
        )
        loss = out.loss if reduction == "mean" else out.loss.sum()
        loss.backward()  # "none" recomputes the chunk loop in backward: observed too
    assert hidden.grad is not None and weight.grad is not None
    if heads:
        assert float(out.kl.max()) > 0  # the regularizer ran: log R and q buffers were used
    # nothing larger than one [C, V] fp32 buffer ever existed (N·V would be the batch's
    # logits), the [C, V] buffers did, and no tensor with V columns had more than C rows
    # (those with fewer: the last, short chunk and the transposed [H, V] and [r, V] weights)
    assert seen.largest == 4 * c * v, (seen.largest, 4 * c * v, 4 * n * v)
    assert (c, v) in seen.vocab_shapes
    assert all(rows <= c for rows, _ in seen.vocab_shapes), sorted(seen.vocab_shapes)
