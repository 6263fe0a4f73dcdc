"""Every loss impl against an fp64 ground truth written here from docs/design.md, "The method".

Forward values and every gradient are checked; shapes include a realistic one and a weird one
(N=41, H=401, V=1271); masks none/some/all; grad_output ≠ 1; several attributes; extreme logits.
The ``triton`` impl runs under ``TRITON_INTERPRET=1`` at small shapes and is skipped when
``attrctl.kernels`` does not provide the function.

Tolerances. fp32 paths accumulate H-long dot products and V-long sums in fp32: relative error
~1e-6·sqrt(H·V) ≲ 1e-4 at these shapes, so fp32 checks use rtol 1e-4 / atol 1e-5 (gradients of
a mean are O(1/N), hence the smaller atol there). bf16 checks are relative to eager's error in
the same dtype (the error budget of STYLE.md practice 9), not absolute tolerances.
"""

from __future__ import annotations

import importlib
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from attrctl.errors import AttrctlError
from attrctl.losses import RegHead, head_fit_loss, regularized_lm_loss, token_kl

IMPLS = ["eager", "chunked", pytest.param("triton", marks=pytest.mark.triton)]
SHAPES = {"small": (16, 24, 300), "weird": (41, 401, 1271), "n1": (1, 32, 517)}
TRITON_SHAPES = {"small", "n1"}  # the interpreter runs one Python loop per row and tile


@pytest.fixture
def use_impl(request, monkeypatch):
    """Returns a function that prepares ``impl`` (interpreter for triton) or skips the test."""

    def prepare(impl: str, op: str, shape: str | None = None) -> str:
        if impl != "triton":
            return impl
        if shape is not None and shape not in TRITON_SHAPES:
            pytest.skip("triton runs under the CPU interpreter only at small shapes")
        kernels = importlib.import_module("attrctl.kernels")
        if not hasattr(kernels, op):
            pytest.skip(f"attrctl.kernels does not provide {op} yet")
        if not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        return impl

    return prepare


# --------------------------------------------------------------------------- fp64 ground truth


def _q_and_kl(logits, log_r, ref=None):
    log_p = torch.log_softmax(logits, -1)
    base = (logits if ref is None else ref).detach()
    log_q = torch.log_softmax(base + log_r, -1).detach()
    q = log_q.exp()
    terms = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q))
    return terms.sum(-1), log_p


def truth_reg_lm(hidden, weight, labels, heads, attr_w, lam, reduction, ignore=-100):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logits = h @ w.T
    log_r = sum(
        a * F.logsigmoid(s.double() @ wk.double().T + (0 if b is None else b.double()))
        for a, (s, wk, b) in zip(attr_w, heads, strict=True)
    )
    valid = labels != ignore
    kl, log_p = _q_and_kl(logits, log_r)
    ce = -log_p.gather(1, labels.clamp(min=0).view(-1, 1)).squeeze(1)
    lam = torch.as_tensor(lam, dtype=torch.float64).expand(len(labels))
    per = torch.where(valid, ce + lam * kl, torch.zeros_like(ce))
    loss = {"none": per, "sum": per.sum(), "mean": per.sum() / max(int(valid.sum()), 1)}
    return loss[reduction], torch.where(valid, ce, 0), torch.where(valid, kl, 0), h, w


def make_reg_inputs(n, h, v, k=2, dtype=torch.float32, seed=0, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / math.sqrt(h) * 2).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    heads = [
        RegHead(
            torch.randn(n, h, generator=g).to(dtype),
            (torch.randn(v, h, generator=g) / math.sqrt(h) * 3).to(dtype),
            torch.randn(v, generator=g).to(dtype) if i == 0 else None,
        )
        for i in range(k)
    ]
    lam = torch.rand(n, generator=g) * 2
    return hidden, weight, labels, heads, lam


def _run_reg(impl, hidden, weight, labels, heads, lam, attr_w, reduction, grad_scale, **kw):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = regularized_lm_loss(
        h, w, labels, heads, lam=lam, attr_weights=attr_w, reduction=reduction, impl=impl, **kw
    )
    g = torch.as_tensor(grad_scale, dtype=torch.float32)
    out.loss.backward(g.expand(len(labels)) if reduction == "none" else g)
    return out, h.grad, w.grad


def _close(actual, expected, rtol=1e-4, atol=1e-5, what=""):
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )


def _trainable(heads):
    """Copies of the heads whose tensors require grad, as leaves."""
    return [
        RegHead(*(None if t is None else t.clone().requires_grad_() for t in hd)) for hd in heads
    ]


def _dyadic(g, shape, scale, bits=6):
    """Random multiples of 2^-bits in [-scale, scale]. Exact in fp32, and so are their short dot
    products and sums (with magnitudes below 2^14), so the fp32 inputs of a test equal its fp64
    truth's exactly and what is compared is the loss's own arithmetic."""
    k = int(scale * 2**bits)
    return torch.randint(-k, k + 1, shape, generator=g).float() / 2**bits


# --------------------------------------------------------------------------- regularized_lm_loss


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_regularized_lm_loss_fp32_matches_fp64(impl, shape, reduction, use_impl):
    impl = use_impl(impl, "regularized_lm_loss", shape)
    n, h, v = SHAPES[shape]
    hidden, weight, labels, heads, lam = make_reg_inputs(n, h, v, ignore_frac=0.25 if n > 1 else 0)
    heads = _trainable(heads)  # heads that would take a gradient if the loss sent one
    attr_w = [1.0, 0.5]
    # grad_output ≠ 1: a scalar for reduced losses, a non-uniform vector for "none"
    g_out = torch.linspace(0.3, 2.0, n) if reduction == "none" else 1.7
    out, gh, gw = _run_reg(
        impl, hidden, weight, labels, heads, lam, attr_w, reduction, g_out, chunk_size=7
    )
    assert all(t.grad is None for hd in heads for t in hd if t is not None)
    heads = [RegHead(*(None if t is None else t.detach() for t in hd)) for hd in heads]
    loss, ce, kl, th, tw = truth_reg_lm(hidden, weight, labels, heads, attr_w, lam, reduction)
    (loss * torch.as_tensor(g_out, dtype=torch.float64)).sum().backward()
    _close(out.loss, loss.detach(), what="loss")
    _close(out.ce, ce.detach(), what="ce")
    _close(out.kl, kl.detach(), atol=2e-5, what="kl")
    assert int(out.n_tokens) == int((labels != -100).sum())
    _close(gh, th.grad, atol=1e-6, what="grad hidden")
    _close(gw, tw.grad, atol=1e-6, what="grad lm_weight")


@pytest.mark.parametrize("impl", IMPLS)
def test_regularized_lm_loss_bf16_error_budget(impl, use_impl):
    """bf16 inputs: the impl's error vs fp64 is no worse than eager's in bf16 (+10% slack for
    fp32-accumulation order, which differs between impls at the ~1e-6 level)."""
    impl = use_impl(impl, "regularized_lm_loss")
    n, h, v = (16, 24, 300) if impl == "triton" else (41, 401, 1271)
    inputs = make_reg_inputs(n, h, v, dtype=torch.bfloat16, seed=3)
    hidden, weight, labels, heads, lam = inputs
    loss, _, _, th, tw = truth_reg_lm(hidden, weight, labels, heads, [1.0, 1.0], lam, "mean")
    loss.backward()

    def errors(which):
        out, gh, gw = _run_reg(which, *inputs[:4], lam, None, "mean", 1.0)
        assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
        return [
            (out.loss.double() - loss).abs().item(),
            (gh.double() - th.grad).abs().max().item(),
            (gw.double() - tw.grad).abs().max().item(),
        ]

    ref, got = errors("eager"), errors(impl)
    for name, e_ref, e_got in zip(("loss", "grad_hidden", "grad_weight"), ref, got, strict=True):
        # bf16 gradients are rounded to 8 bits: budget = eager's error, plus one bf16 ulp of
        # slack only where eager happens to be exactly right
        assert e_got <= 1.1 * e_ref + 1e-6, f"{name}: {impl} {e_got:.3g} > eager {e_ref:.3g}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_regularized_lm_loss_all_ignored(impl, reduction, use_impl):
    impl = use_impl(impl, "regularized_lm_loss")
    hidden, weight, _, heads, lam = make_reg_inputs(8, 16, 100, k=1)
    labels = torch.full((8,), -100)
    out, gh, gw = _run_reg(impl, hidden, weight, labels, heads, lam, None, reduction, 1.0)
    assert torch.all(out.loss == 0) and int(out.n_tokens) == 0
    assert torch.all(gh == 0) and torch.all(gw == 0)
    assert torch.all(out.ce == 0) and torch.all(out.kl == 0)


def _extreme_inputs(n=6, h=8, v=300, seed=0):
    """LM logits at ±1e4 that are *not* one-hot: two groups of 24 tokens share an offset of ±1e4
    (the row's sign picks which group is on top) plus dyadic O(1) parts, so p spreads over the
    top group (max p ≈ 0.2–0.35). Two heads with O(1) logits plus ±50 on a few tokens of each
    group give KL ≈ 0.3–0.5. Labels: in the top group, one at −1e4 (CE ≈ 2e4) and one at 0
    (CE ≈ 1e4). Every input is exact in fp32, so is ℓ = hidden @ Wᵀ."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(v, generator=g)
    top_a, top_b = perm[:24], perm[24:48]
    hidden = _dyadic(g, (n, h), 1.0, bits=1)
    hidden[:, 0] = torch.tensor([1.0, -1.0]).repeat(n // 2)
    weight = _dyadic(g, (v, h), 1.0)
    weight[:, 0] = 0.0
    weight[top_a, 0] = 1e4
    weight[top_b, 0] = -1e4
    bias = torch.zeros(v)
    bias[torch.cat([top_a[:3], top_b[:3]])] = -50.0  # vetoes inside the groups, modes included
    bias[torch.cat([top_a[3:6], top_b[3:6]])] = 50.0
    heads = [
        RegHead(_dyadic(g, (n, 4), 1.0, bits=1), _dyadic(g, (v, 4), 2.0, bits=5), b)
        for b in (bias, None)
    ]
    top = torch.where(hidden[:, :1] > 0, top_a, top_b)  # [n, 24] the row's top group
    labels = top[torch.arange(n), torch.randint(0, 24, (n,), generator=g)]
    labels[1], labels[2] = top_a[7], perm[100]  # row 1's top group is B: ℓ_y = −1e4; ℓ_y ≈ 0
    lam = torch.rand(n, generator=g) * 2
    return hidden, weight, labels, heads, lam


@pytest.mark.parametrize("impl", IMPLS)
def test_regularized_lm_loss_extreme_logits(impl, use_impl):
    """LM logits at ±1e4 (exact in fp32) with p spread over many tokens, head logits at ±50."""
    impl = use_impl(impl, "regularized_lm_loss")
    hidden, weight, labels, heads, lam = _extreme_inputs()
    attr_w = [1.0, 0.5]
    logits = hidden.double() @ weight.double().T
    assert torch.equal((hidden @ weight.T).double(), logits)  # the inputs are exact
    assert 9e3 < logits.abs().max() < 1.1e4 and torch.softmax(logits, -1).amax(-1).max() < 0.5
    out, gh, gw = _run_reg(
        impl, hidden, weight, labels, heads, lam, attr_w, "sum", 1.0, chunk_size=4
    )
    loss, ce, kl, th, tw = truth_reg_lm(hidden, weight, labels, heads, attr_w, lam, "sum")
    loss.backward()
    assert kl.min() > 0.1  # a KL bug cannot hide in a KL of 1e-10
    # with exact inputs, what is left is fp32 arithmetic on the loss's own terms: sums over V of
    # O(1) numbers for the KL (a plain fp32 LSE(ℓ + log R) − LSE(ℓ) at |ℓ| = 1e4 would be off
    # by the ulp of 1e4, 1e-3), and a few ulps of the value for the CE (up to 2e4)
    _close(out.kl, kl.detach(), rtol=0, atol=1e-6, what="kl")
    _close(out.ce, ce.detach(), rtol=1e-7, atol=1e-6, what="ce")
    _close(out.loss, loss.detach(), rtol=1e-6, atol=0, what="loss")
    # gradients: the 1e4 column of W multiplies sums of p − q that cancel to O(1/V), so grad
    # hidden is compared relative to its largest entry
    for name, got, want in (("hidden", gh, th.grad), ("lm_weight", gw, tw.grad)):
        _close(got, want, rtol=0, atol=1e-6 * want.abs().max().item(), what=f"grad {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_heads_give_zero_kl_and_plain_ce(impl, use_impl):
    """σ(0)=½ everywhere (zero-initialised heads) gives q = p: KL 0, loss = CE."""
    impl = use_impl(impl, "regularized_lm_loss")
    hidden, weight, labels, heads, _ = make_reg_inputs(12, 16, 257, k=1)
    zero_head = [RegHead(heads[0].states, torch.zeros_like(heads[0].weight), None)]
    out = regularized_lm_loss(hidden, weight, labels, zero_head, lam=3.0, impl=impl)
    assert out.kl.abs().max() < 1e-7  # log R = −log 2 everywhere: q = p term for term
    valid = labels != -100
    logits = hidden.double() @ weight.double().T  # CE = LSE(ℓ) − ℓ_y, in fp64
    ce = torch.logsumexp(logits, -1) - logits.gather(1, labels.clamp(min=0).view(-1, 1)).view(-1)
    _close(out.ce[valid], ce[valid])
    _close(out.loss, ce[valid].mean())


def _near_minus_50(n, v, profile, seed=4):
    """Two heads' logits at r ≈ −50 on every entry, so log R = logσ(r₁) + logσ(r₂) ≈ −100.

    "flat": r = −50 exactly (KL 0: log R is constant). "nearly_flat": −50 plus dyadic offsets in
    [−1/4, 1/4]; logσ(r) = r exactly at r ≈ −50 and the sums are exact, so log R is exact in
    fp32 and varies by up to 1 (KL ≈ 1e-3..1e-2)."""
    g = torch.Generator().manual_seed(seed)
    reg = torch.full((2, n, v), -50.0)
    if profile == "nearly_flat":
        reg += _dyadic(g, (2, n, v), 0.25)
    return reg


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("profile", ["flat", "nearly_flat"])
def test_token_kl_does_not_cancel_at_very_negative_log_r(impl, profile, use_impl):
    """KL = E_q[log R] − log E_p[R] subtracts two terms ≈ −100 here; in fp32 that lost ~1e-5 and
    gave KLs of −2e-5 where the truth is 0. Each impl must be within 1e-6 of fp64 and ≥ −1e-7."""
    impl = use_impl(impl, "token_kl")
    n, v = 8, 300
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(n, v, generator=g) * 3
    reg = _near_minus_50(n, v, profile)
    x = logits.clone().requires_grad_()
    kl = token_kl(x, reg, impl=impl)
    g_out = torch.linspace(-1.0, 2.0, n)
    kl.backward(g_out)
    ld = logits.double()
    log_q = torch.log_softmax(ld + F.logsigmoid(reg.double()).sum(0), -1)
    log_p = torch.log_softmax(ld, -1)
    truth = (log_q.exp() * (log_q - log_p)).sum(-1)
    if profile == "flat":
        assert truth.abs().max() < 1e-12
    else:
        assert truth.min() > 1e-4  # not 0: the comparison below sees a value
    # fp32 sums over V = 300 of O(1) terms, and log softmax of O(10) logits: a few 1e-7
    _close(kl, truth, rtol=0, atol=1e-6, what="kl")
    assert kl.min() >= -1e-7, "a KL is never negative"
    _close(x.grad, g_out.double().view(-1, 1) * (log_p.exp() - log_q.exp()), atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("profile", ["flat", "nearly_flat"])
def test_regularized_lm_loss_kl_does_not_cancel_at_very_negative_log_r(impl, profile, use_impl):
    """The fused loss computes its KL in its own code (closed form, online in Triton): the same
    two heads at r ≈ −50, here as bias −50 plus a dyadic linear part (exact in fp32)."""
    impl = use_impl(impl, "regularized_lm_loss")
    n, h, v = 8, 16, 300
    hidden, weight, labels, _, lam = make_reg_inputs(n, h, v, k=0, ignore_frac=0, seed=6)
    g = torch.Generator().manual_seed(7)
    scale = 0.0 if profile == "flat" else 1 / 16  # |states| ≤ 1, |W| ≤ 1/16: |r + 50| ≤ 1/4
    heads = [
        RegHead(_dyadic(g, (n, 4), 1.0, bits=1), _dyadic(g, (v, 4), scale), torch.full((v,), -50.0))
        for _ in range(2)
    ]
    out, gh, gw = _run_reg(impl, hidden, weight, labels, heads, lam, None, "mean", 1.0)
    loss, _, kl, th, tw = truth_reg_lm(hidden, weight, labels, heads, [1.0, 1.0], lam, "mean")
    loss.backward()
    if profile == "nearly_flat":
        assert kl.min() > 1e-4
    _close(out.kl, kl.detach(), rtol=0, atol=1e-6, what="kl")
    assert out.kl.min() >= -1e-7, "a KL is never negative"
    _close(gh, th.grad, atol=1e-6, what="grad hidden")
    _close(gw, tw.grad, atol=1e-6, what="grad lm_weight")


class _MatmulShapes(TorchDispatchMode):
    """Records the output shape of every matrix product that runs (below autograd, so the
    products of a backward pass and of a custom autograd.Function count too)."""

    OPS = ("mm", "addmm", "addmm_", "bmm", "baddbmm")

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in self.OPS:
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("frozen", ["lm_weight", "hidden"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_frozen_inputs_get_no_gradient_and_no_gradient_matmul(impl, frozen, reduction, use_impl):
    """A frozen LM head (top layers, LoRA, tied embeddings) must not cost the [V, H] weight-
    gradient GEMM, nor a frozen hidden its [N, H] one; the other gradient is unchanged."""
    impl = use_impl(impl, "regularized_lm_loss")
    n, h, v = 13, 12, 70  # distinct sizes: a product's output shape says which gradient it is
    hidden, weight, labels, heads, lam = make_reg_inputs(n, h, v, k=2, seed=8)
    g_out = torch.linspace(0.5, 1.5, n) if reduction == "none" else torch.tensor(1.3)
    ref = _run_reg("eager", hidden, weight, labels, heads, lam, None, reduction, g_out)
    hx = hidden.clone().requires_grad_(frozen != "hidden")
    wx = weight.clone().requires_grad_(frozen != "lm_weight")
    with _MatmulShapes() as mm:
        out = regularized_lm_loss(
            hx, wx, labels, heads, lam=lam, reduction=reduction, impl=impl, chunk_size=5
        )
        out.loss.backward(g_out.expand(n) if reduction == "none" else g_out)
    weight_grad_mms = [s for s in mm.shapes if s in ((v, h), (h, v))]
    hidden_grad_mms = [s for s in mm.shapes if len(s) == 2 and s[1] == h and s[0] != v]
    _close(out.loss, ref[0].loss, what="loss")
    if frozen == "lm_weight":
        assert wx.grad is None and weight_grad_mms == [], mm.shapes
        assert hidden_grad_mms, mm.shapes  # the count sees the product it should
        _close(hx.grad, ref[1], atol=1e-7, what="grad hidden")
    else:
        assert hx.grad is None and hidden_grad_mms == [], mm.shapes
        assert weight_grad_mms, mm.shapes
        _close(wx.grad, ref[2], atol=1e-7, what="grad lm_weight")


@pytest.mark.parametrize("impl", IMPLS)
def test_heads_get_no_gradient_even_when_they_read_the_trained_hidden(impl, use_impl):
    """Heads are frozen: with head tensors that require grad, and a head that reads the very
    hidden states being trained, no gradient reaches the heads or flows back through them."""
    impl = use_impl(impl, "regularized_lm_loss")
    hidden, weight, labels, heads, lam = make_reg_inputs(10, 16, 200, k=1, seed=9)
    hx = hidden.clone().requires_grad_()
    head_w = heads[0].weight.clone().requires_grad_()
    head_b = heads[0].bias.clone().requires_grad_()
    out = regularized_lm_loss(hx, weight, labels, [RegHead(hx, head_w, head_b)], lam=lam, impl=impl)
    out.loss.backward()
    assert head_w.grad is None and head_b.grad is None
    frozen = [RegHead(hidden, heads[0].weight, heads[0].bias)]
    loss, _, _, th, _ = truth_reg_lm(hidden, weight, labels, frozen, [1.0], lam, "mean")
    loss.backward()
    # a gradient through the head's states would add λ·∂KL/∂r·W_head to this
    _close(hx.grad, th.grad, atol=1e-6, what="grad hidden")


# --------------------------------------------------------------------------- token_kl


def _kl_inputs(n=9, v=301, k=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g) * 3
    reg = torch.randn(k, n, v, generator=g) * 4
    return logits, reg


@pytest.mark.parametrize("impl", IMPLS)
def test_token_kl_direction_and_gradient(impl, use_impl):
    """The value is KL(q‖p), not KL(p‖q); the gradient is grad_out·(p − q)."""
    impl = use_impl(impl, "token_kl")
    logits, reg = _kl_inputs()
    w = torch.tensor([1.0, 0.7])
    x = logits.clone().requires_grad_()
    kl = token_kl(x, reg, attr_weights=w, impl=impl)
    p = torch.softmax(logits.double(), -1)
    log_r = (w.double().view(-1, 1, 1) * F.logsigmoid(reg.double())).sum(0)
    q = torch.softmax(logits.double() + log_r, -1)
    forward_kl = (q * (q.log() - p.log())).sum(-1)
    reverse_kl = (p * (p.log() - q.log())).sum(-1)
    _close(kl, forward_kl, atol=1e-5)
    # the two directions differ by far more than the tolerance at these inputs
    assert (forward_kl - reverse_kl).abs().max() > 100 * 1e-5
    g_out = torch.linspace(-1.0, 2.0, len(kl))
    kl.backward(g_out)
    _close(x.grad, g_out.double().view(-1, 1) * (p - q), atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_token_kl_masked_vocab_ref_and_row_mask(impl, use_impl):
    """-inf logits (masked vocabulary), a reference model's logits, masked rows, K=1 as [N, V]."""
    impl = use_impl(impl, "token_kl")
    logits, reg = _kl_inputs(n=7, v=263, k=1)
    ref = torch.randn_like(logits) * 2
    logits[:, 5:40] = float("-inf")
    ref[:, 5:40] = float("-inf")
    mask = torch.tensor([True, False, True, True, False, True, True])
    logits[1] = float("-inf")  # garbage on a masked row must not leak
    x = logits.clone().requires_grad_()
    kl = token_kl(x, reg[0], ref_logits=ref, mask=mask, impl=impl)
    kl.sum().backward()
    ld, rd = logits.double(), ref.double()
    log_p = torch.log_softmax(torch.where(mask.view(-1, 1), ld, 0.0), -1)
    q = torch.softmax(rd + F.logsigmoid(reg[0].double()), -1)
    expected = torch.where(q > 0, q * (q.log() - log_p), 0).sum(-1) * mask
    assert torch.isfinite(kl).all() and torch.isfinite(x.grad).all()
    _close(kl, expected, atol=1e-5)
    _close(x.grad, (log_p.exp() - q) * mask.view(-1, 1), atol=1e-6)
    assert torch.all(x.grad[:, 5:40] == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_token_kl_extreme_logits(impl, use_impl):
    impl = use_impl(impl, "token_kl")
    logits, reg = _kl_inputs(n=5, v=200, k=1)
    logits = logits / logits.abs().max() * 1e4
    reg = reg / reg.abs().max() * 50
    x = logits.clone().requires_grad_()
    kl = token_kl(x, reg, impl=impl)
    kl.sum().backward()
    p = torch.softmax(logits.double(), -1)
    log_q = torch.log_softmax(logits.double() + F.logsigmoid(reg[0].double()), -1)
    q = log_q.exp()
    expected = torch.where(q > 0, q * (log_q - torch.log_softmax(logits.double(), -1)), 0).sum(-1)
    assert torch.isfinite(kl).all() and torch.isfinite(x.grad).all()
    _close(kl, expected, atol=1e-3)  # ulp(1e4) in fp32 is 1e-3
    _close(x.grad, p - q, atol=1e-5)


# --------------------------------------------------------------------------- head_fit_loss


def truth_head_fit(hidden, lm_w, states, w, b, tokens, y, mu, mask, pair, reduction):
    s = states.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    bd = None if b is None else b.detach().double().requires_grad_()
    logits = hidden.double() @ lm_w.double().T
    r = s @ wd.T + (0 if bd is None else bd)
    a = r.gather(1, tokens.view(-1, 1)).squeeze(1)
    # from the definitions, not the closed forms the impls use: BCE = −y log σ(a) − (1−y) log σ(−a)
    # and m = log E_p[σ(r)] as an explicit expectation (fp64: σ(−50) = 2e-22 is representable)
    bce = -(y.double() * torch.sigmoid(a).log() + (1 - y.double()) * torch.sigmoid(-a).log())
    bce = bce * mask
    m = (torch.softmax(logits, -1) * torch.sigmoid(r)).sum(-1).log()
    prev = torch.cat([a.new_zeros(1), torch.sigmoid(a[:-1]).log()])
    cons = (prev - m) ** 2 * pair
    per = bce + mu * cons
    loss = {"none": per, "sum": per.sum(), "mean": per.sum() / max(int(mask.sum()), 1)}
    return loss[reduction], bce, cons, s, wd, bd


def _head_inputs(n, h, v, hk, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    lm_w = torch.randn(v, h, generator=g) / math.sqrt(h) * 2
    states = torch.randn(n, hk, generator=g)
    w = torch.randn(v, hk, generator=g) / math.sqrt(hk) * scale
    b = torch.randn(v, generator=g) * 0.5
    tokens = torch.randint(0, v, (n,), generator=g)
    y = torch.rand(n, generator=g)
    return hidden, lm_w, states, w, b, tokens, y


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("masking", ["none", "some", "all", "sparse_pairs"])
def test_head_fit_loss_matches_fp64(impl, shape, reduction, masking, use_impl):
    impl = use_impl(impl, "head_fit_loss", shape)
    n, h, v = SHAPES[shape]
    hidden, lm_w, states, w, b, tokens, y = _head_inputs(n, h, v, hk=max(8, h // 2))
    mask = {
        "none": torch.ones(n, dtype=torch.bool),
        "some": torch.arange(n) % 5 != 2,
        "all": torch.zeros(n, dtype=torch.bool),
        "sparse_pairs": torch.ones(n, dtype=torch.bool),
    }[masking]
    tokens_in = torch.where(mask, tokens, -1)  # garbage tokens off the mask are allowed
    pair = torch.zeros(n, dtype=torch.bool)
    pair[1:] = mask[1:] & mask[:-1]
    explicit = {}
    if masking == "sparse_pairs":  # the consistency on a random quarter of the rows (head fitting)
        pair &= torch.rand(n, generator=torch.Generator().manual_seed(3)) < 0.25
        explicit = {"pair_mask": pair}
    mu = 0.7
    sp, wp, bp = (t.clone().requires_grad_() for t in (states, w, b))
    out = head_fit_loss(
        hidden, lm_w, sp, wp, bp, tokens_in, y, mu=mu, mask=mask, reduction=reduction,
        impl=impl, chunk_size=5, **explicit,
    )  # fmt: skip
    g_out = torch.linspace(0.5, 1.5, n) if reduction == "none" else torch.tensor(1.3)
    out.loss.backward(g_out)
    tok = torch.where(mask, tokens, 0)
    loss, bce, cons, s, wd, bd = truth_head_fit(
        hidden, lm_w, states, w, b, tok, y, mu, mask, pair, reduction
    )
    (loss * g_out.double()).sum().backward()
    _close(out.loss, loss.detach(), what="loss")
    _close(out.bce, bce.detach(), what="bce")
    _close(out.consistency, cons.detach(), what="consistency")
    for got, want, name in ((sp.grad, s.grad, "states"), (wp.grad, wd.grad, "weight")):
        _close(got, want, atol=1e-6, what=f"grad {name}")
    _close(bp.grad, bd.grad, atol=1e-6, what="grad bias")
    if masking == "all":
        assert torch.all(out.loss == 0) and torch.all(sp.grad == 0) and torch.all(wp.grad == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_head_fit_loss_extreme_head_logits(impl, use_impl):
    """Head logits of ±50: logσ(−50) = −50 must not underflow to −inf (nor σ to 0 → log 0)."""
    impl = use_impl(impl, "head_fit_loss")
    n, h, v = 10, 16, 300
    hidden, lm_w, states, w, _, tokens, y = _head_inputs(n, h, v, hk=8, seed=2)
    w = w / (states @ w.T).abs().max() * 50
    sp, wp = states.clone().requires_grad_(), w.clone().requires_grad_()
    out = head_fit_loss(hidden, lm_w, sp, wp, None, tokens, y, mu=1.0, reduction="sum", impl=impl)
    out.loss.backward()
    mask = torch.ones(n, dtype=torch.bool)
    pair = mask.clone()
    pair[0] = False
    loss, _, _, s, wd, _ = truth_head_fit(
        hidden, lm_w, states, w, None, tokens, y, 1.0, mask, pair, "sum"
    )
    loss.backward()
    assert (
        torch.isfinite(out.loss) and torch.isfinite(sp.grad).all() and torch.isfinite(wp.grad).all()
    )
    # values reach ~50² = 2500 in the consistency: rtol carries fp32's 1e-7 times that scale
    _close(out.loss, loss.detach(), rtol=1e-4, atol=1e-3)
    _close(sp.grad, s.grad, rtol=1e-3, atol=1e-3)
    _close(wp.grad, wd.grad, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- dispatcher


def test_auto_picks_chunked_on_cpu_and_logs_once(caplog):
    from attrctl.losses import dispatch

    dispatch._LOGGED.clear()
    hidden, weight, labels, heads, lam = make_reg_inputs(4, 8, 50, k=1)
    with caplog.at_level(logging.INFO, logger="attrctl.losses"):
        for _ in range(3):
            regularized_lm_loss(hidden, weight, labels, heads, lam=lam, impl="auto")
    msgs = [r.getMessage() for r in caplog.records if "impl=auto" in r.getMessage()]
    assert len(msgs) == 1 and "chunked" in msgs[0]


def test_explicit_triton_without_cuda_or_interpreter_names_why(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, weight, labels, heads, lam = make_reg_inputs(4, 8, 50, k=1)
    with pytest.raises(AttrctlError, match="TRITON_INTERPRET"):
        regularized_lm_loss(hidden, weight, labels, heads, lam=lam, impl="triton")


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"impl": "fast"}, ValueError, "impl must be one of"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"lam": "x"}, TypeError, "lam must be"),
        ({"lam": torch.ones(3)}, ValueError, "lam must be"),
        ({"attr_weights": [1.0, 2.0]}, ValueError, "one weight per attribute"),
        ({"labels": torch.full((4,), 50)}, ValueError, "labels must be in"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
    ],
)
def test_regularized_lm_loss_rejects_bad_input(change, error, match):
    hidden, weight, labels, heads, lam = make_reg_inputs(4, 8, 50, k=1)
    kw = {"lam": lam, "impl": "chunked", "labels": labels} | change
    labels = kw.pop("labels")
    with pytest.raises(error, match=match):
        regularized_lm_loss(hidden, weight, labels, heads, **kw)
