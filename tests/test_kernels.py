"""Adversarial tests of the Triton kernels (``attrctl.kernels``) against fp64 ground truth.

Without CUDA the kernels run under Triton's CPU interpreter. Triton decides between compiling
and interpreting when a ``@triton.jit`` function is *defined*, so ``TRITON_INTERPRET=1`` is set
below before anything imports the kernel modules (``attrctl.kernels`` itself does not import
Triton). Interpreter shapes stay small (N ≤ 17, V ≤ 300); tiles of 64 make every row take
several tiles plus a ragged tail.

Ground truth is written here from the definitions in docs/design.md, "The method", in fp64 with
autograd, and shares no code with either the kernels or ``eager``. ``eager`` (fp32) gives the error budget:
the kernel in a dtype may not be worse than the plain PyTorch path in that dtype.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from attrctl.kernels import (
    KernelConfig,
    head_fit_loss,
    regularized_lm_loss,
    token_kl,
    triton_support,
)

from attrctl.losses import eager
from attrctl.losses.types import LossOptions, RegHead

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = KernelConfig(block_v=64)  # several tiles per row, and a ragged last tile

pytestmark = [
    pytest.mark.triton,
    # the interpreter evaluates both sides of tl.where in numpy (e.g. exp(-inf - -inf) on lanes
    # that are then discarded) and numpy warns about it; the results are checked below
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

if DEVICE == "cpu" and not triton_support("cpu")[0]:  # e.g. TRITON_INTERPRET=0 exported
    pytest.skip(triton_support("cpu")[1], allow_module_level=True)


def _err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return (x.double() - truth.double()).abs().max().item()


def _bf16_ulp(truth: torch.Tensor) -> float:
    # one bf16 ulp at the largest magnitude (8 significant bits: 2^-7 relative at the binade top)
    return truth.abs().max().item() * 2**-7


# ----------------------------------------------------------------------------- ground truth
def truth_token_kl(logits, reg, w, ref, mask):
    """fp64 KL(q‖p) per row and its autograd gradient machinery (q detached)."""
    log_p = torch.log_softmax(logits, -1)
    base = (logits if ref is None else ref).detach()
    log_q = torch.log_softmax(base + (w.view(-1, 1, 1) * F.logsigmoid(reg)).sum(0), -1).detach()
    q = log_q.exp()
    kl = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(-1)
    return kl if mask is None else torch.where(mask, kl, torch.zeros_like(kl))


def _make_kl_inputs(n, v, k, *, seed, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    reg = torch.randn(k, n, v, generator=g, dtype=torch.float64) * 4
    ref = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    w = torch.rand(k, generator=g, dtype=torch.float64) + 0.25
    grad_out = torch.randn(n, generator=g, dtype=torch.float64)  # ≠ 1, mixed signs

    def cast(x):
        return x.to(dtype).to(DEVICE)

    return cast(logits), cast(reg), w.float().to(DEVICE), cast(ref), grad_out.to(DEVICE)


def _run_kl(fn, logits, reg, w, ref, mask, grad_out, **kw):
    x = logits.detach().clone().requires_grad_()
    kl = fn(x, reg, w, ref, mask, **kw)
    (kl * grad_out.to(kl.dtype)).sum().backward()
    return kl.detach(), x.grad


def _masks(n: int) -> dict[str, torch.Tensor | None]:
    some = torch.ones(n, dtype=torch.bool, device=DEVICE)
    some[::3] = False
    return {"none": None, "some": some, "all": torch.zeros(n, dtype=torch.bool, device=DEVICE)}


# ----------------------------------------------------------------------------- token_kl
@pytest.mark.parametrize("use_ref", [False, True])
@pytest.mark.parametrize(("n", "v", "k"), [(1, 7, 1), (17, 300, 2)])
def test_token_kl_fp32_matches_fp64_truth(n, v, k, use_ref):
    logits, reg, w, ref, grad_out = _make_kl_inputs(n, v, k, seed=n + v)
    ref = ref if use_ref else None
    for name, mask in _masks(n).items():
        kl, grad = _run_kl(token_kl, logits, reg, w, ref, mask, grad_out, config=SMALL)
        tkl, tgrad = _run_kl(
            truth_token_kl, logits.double(), reg.double(), w.double(), _d(ref), mask, grad_out
        )
        # fp32 accumulation over ≤ 300 terms of O(1): a few ulps of the O(1) result
        assert _err(kl, tkl) < 2e-5, name
        assert _err(grad, tgrad) < 2e-6, name
        if mask is not None:
            assert torch.all(kl[~mask] == 0) and torch.all(grad[~mask] == 0), name


def _d(x):
    return None if x is None else x.double()


def test_token_kl_direction_is_forward_kl_from_q():
    # KL(q‖p) and KL(p‖q) differ by O(1) on these inputs, so this would catch a swap
    logits, reg, w, _, grad_out = _make_kl_inputs(5, 90, 1, seed=3)
    kl, grad = _run_kl(token_kl, logits, reg, w, None, None, grad_out)
    log_p = torch.log_softmax(logits.double(), -1)
    log_q = torch.log_softmax(logits.double() + w.double() * F.logsigmoid(reg[0].double()), -1)
    forward = (log_q.exp() * (log_q - log_p)).sum(-1)
    reverse = (log_p.exp() * (log_p - log_q)).sum(-1)
    assert _err(forward, reverse) > 1e-2
    assert _err(kl, forward) < 1e-5
    # the gradient is grad_out·(p − q): q is the detached target, p is trained
    expect = grad_out.view(-1, 1) * (log_p.exp() - log_q.exp())
    assert _err(grad, expect) < 1e-6


def test_token_kl_zero_heads_give_zero():
    # σ(0) = ½ everywhere: log R is a constant, q = p, KL = 0 and no gradient (docs/design.md,
    # "Zero-initialised heads")
    logits, reg, w, _, grad_out = _make_kl_inputs(6, 130, 2, seed=4)
    kl, grad = _run_kl(token_kl, logits, torch.zeros_like(reg), w, None, None, grad_out)
    assert kl.abs().max() < 1e-6 and grad.abs().max() < 1e-7


def test_token_kl_extreme_logits():
    """Logits at ±1e4, head logits at ±50, masked (−inf) vocabulary entries."""
    n, v = 6, 200
    g = torch.Generator().manual_seed(5)
    logits = 1e4 + torch.randn(n, v, generator=g, dtype=torch.float64)  # near-ties at 1e4
    logits[1] = -1e4 + torch.randn(v, generator=g, dtype=torch.float64)
    logits[2, ::2] = -1e4  # half the row at the other extreme
    logits[3, 50:] = float("-inf")  # masked vocabulary; the live entries end mid-tile
    logits[4, :199] = float("-inf")  # one live entry, in the last (ragged) tile
    reg = (torch.rand(2, n, v, generator=g, dtype=torch.float64) * 100 - 50).round()  # ±50
    reg[0, 5] = -50.0  # R = σ(−50)² ≈ e^−100 on the whole row: log R must stay finite
    reg[1, 5] = -50.0
    w = torch.tensor([1.0, 1.0], device=DEVICE)
    grad_out = torch.linspace(-2, 2, n, dtype=torch.float64)
    l32, r32 = logits.float().to(DEVICE), reg.float().to(DEVICE)
    kl, grad = _run_kl(token_kl, l32, r32, w, None, None, grad_out.to(DEVICE), config=SMALL)
    tkl, tgrad = _run_kl(
        truth_token_kl, l32.double().cpu(), r32.double().cpu(), w.double().cpu(), None, None,
        grad_out,
    )  # fmt: skip
    ekl, egrad = _run_kl(eager.token_kl, l32, r32, w, None, None, grad_out.to(DEVICE))
    assert torch.isfinite(kl).all() and torch.isfinite(grad).all()
    # the anchored two-LSE form keeps KL to fp32 rounding of O(1) numbers even at |ℓ| = 1e4,
    # where a plain LSE difference loses ~1e-3 (the ulp of 1e4) — never worse than eager
    assert _err(kl, tkl) <= max(1e-6, 1.01 * _err(ekl, tkl))
    assert _err(grad, tgrad) <= max(1e-6, 1.01 * _err(egrad, tgrad))
    assert kl[4].abs() < 1e-6  # a single live entry: p = q = onehot
    assert kl[5].abs() <= 1e-7  # log R = −100 on the whole row: q = p, nothing may cancel


def test_token_kl_bf16_within_eager_budget():
    # bf16 inputs, fp64 truth *of the same bf16 values*: what is left is compute error. The
    # kernel accumulates in fp32 like eager and writes the gradient in bf16 like autograd does,
    # so it may differ from eager by the rounding of that bf16 output: at most one bf16 ulp.
    logits, reg, w, ref, grad_out = _make_kl_inputs(17, 300, 2, seed=7, dtype=torch.bfloat16)
    for use_ref in (False, True):
        r = ref if use_ref else None
        kl, grad = _run_kl(token_kl, logits, reg, w, r, None, grad_out, config=SMALL)
        ekl, egrad = _run_kl(eager.token_kl, logits, reg, w, r, None, grad_out)
        tkl, tgrad = _run_kl(
            truth_token_kl, logits.double(), reg.double(), w.double(), _d(r), None, grad_out
        )
        assert grad.dtype == torch.bfloat16
        assert _err(kl, tkl) <= 2 * _err(ekl, tkl) + 1e-5  # both fp32 outputs: ~ulps of O(1)
        assert _err(grad, tgrad) <= _err(egrad, tgrad) + _bf16_ulp(tgrad)


# ----------------------------------------------------------------------------- fused LM loss
def truth_lm_loss(hidden, lm_weight, labels, heads, w, lam, reduction, ignore_index=-100):
    """fp64 CE + λ·KL(sg[q]‖p) from the definitions; autograd gives the gradients."""
    logits = hidden @ lm_weight.T
    valid = labels != ignore_index
    log_p = torch.log_softmax(logits, -1)
    log_r = sum(
        (wk * F.logsigmoid(h.states @ h.weight.T + (0 if h.bias is None else h.bias)))
        for wk, h in zip(w.tolist(), heads, strict=True)
    )
    log_q = torch.log_softmax(logits.detach() + log_r, -1).detach()
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    ce = -log_p.gather(1, torch.where(valid, labels, 0).view(-1, 1)).squeeze(1)
    per = torch.where(valid, ce + lam * kl, torch.zeros_like(ce))
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / valid.sum().clamp(min=1)


def _lm_inputs(n, h, v, k, *, seed, dtype=torch.float32, ignore="some"):
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, sc=1.0):
        return torch.randn(*s, generator=g, dtype=torch.float64) * sc

    hidden, weight = rnd(n, h), rnd(v, h, sc=h**-0.5 * 3)
    heads = [
        RegHead(rnd(n, 8), rnd(v, 8, sc=0.8), rnd(v) if i == 0 else None) for i in range(k)
    ]  # head 0 has a bias, head 1 does not
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore == "some":
        labels[1::4] = -100
    elif ignore == "all":
        labels[:] = -100
    lam = torch.rand(n, generator=g, dtype=torch.float64) * 2  # per-token λ_t (domains)
    w = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
    return hidden, weight, labels, heads, w, lam


def _cast_heads(heads, dtype):
    return [RegHead(*(None if t is None else t.to(dtype).to(DEVICE) for t in hd)) for hd in heads]


def _run_lm(fn, hidden, weight, labels, heads, w, lam, grad_out, **kw):
    hx, wx = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fn(hx, wx, labels, heads, w, lam, **kw)
    loss = out if isinstance(out, torch.Tensor) else out.loss
    (loss * grad_out.to(loss.dtype)).sum().backward()
    return out, hx.grad, wx.grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    ("n", "h", "v", "k", "chunk"),
    [(1, 8, 33, 1, None), (17, 24, 300, 2, 5), (9, 16, 130, 0, 4)],
)  # N = 1; ragged chunks 5+5+5+2 over a V that is no multiple of the tile; K = 0 (plain CE)
def test_lm_loss_fp32_matches_fp64_truth(n, h, v, k, chunk, reduction):
    hidden, weight, labels, heads, w, lam = _lm_inputs(n, h, v, k, seed=n * v)
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(n, generator=g) if reduction == "none" else torch.tensor(-1.7)
    labels_d = labels.to(DEVICE)
    out, gh, gw = _run_lm(
        regularized_lm_loss, hidden.float().to(DEVICE), weight.float().to(DEVICE), labels_d,
        _cast_heads(heads, torch.float32), w.float().to(DEVICE), lam.float().to(DEVICE),
        grad_out.to(DEVICE), opts=LossOptions(reduction=reduction, chunk_size=chunk),
        config=SMALL,
    )  # fmt: skip
    tloss, tgh, tgw = _run_lm(
        truth_lm_loss, hidden, weight, labels, heads, w, lam, grad_out.double(),
        reduction=reduction,
    )  # fmt: skip
    valid = labels_d != -100
    assert out.n_tokens.item() == valid.sum().item()
    # fp32 matmuls over H ≤ 24 and sums over V ≤ 300 of O(1) terms: ≤ ~1e-5 absolute
    assert _err(out.loss, tloss) < 5e-5
    assert _err(gh, tgh) < 5e-5 and _err(gw, tgw) < 5e-5
    assert torch.all(out.ce[~valid] == 0) and torch.all(out.kl[~valid] == 0)
    assert torch.all(out.kl[valid] >= -1e-6)  # a KL is never negative
    assert not out.ce.requires_grad and not out.kl.requires_grad


def test_lm_loss_all_ignored_is_zero_without_nan():
    hidden, weight, labels, heads, w, lam = _lm_inputs(6, 8, 70, 1, seed=2, ignore="all")
    for reduction in ("mean", "sum", "none"):
        out, gh, gw = _run_lm(
            regularized_lm_loss, hidden.float(), weight.float(), labels,
            _cast_heads(heads, torch.float32), w.float(), lam.float(),
            torch.tensor(2.0), opts=LossOptions(reduction=reduction), config=SMALL,
        )  # fmt: skip
        assert torch.all(out.loss == 0) and out.n_tokens.item() == 0
        assert torch.all(gh == 0) and torch.all(gw == 0)


def test_lm_loss_heads_get_no_gradient_and_inference_works():
    hidden, weight, labels, heads, w, lam = _lm_inputs(5, 8, 70, 1, seed=3)
    states = heads[0].states.float().requires_grad_()
    head = RegHead(states, heads[0].weight.float().requires_grad_(), None)
    h32 = hidden.float().requires_grad_()
    out = regularized_lm_loss(h32, weight.float(), labels, [head], w.float(), lam.float(),
                              LossOptions(), SMALL)  # fmt: skip
    out.loss.backward()
    assert head.states.grad is None and head.weight.grad is None and h32.grad is not None
    with torch.no_grad():  # no gradient requested: the kernel skips the gradient sweep
        out2 = regularized_lm_loss(hidden.float(), weight.float(), labels, [head], w.float(),
                                   lam.float(), LossOptions(), SMALL)  # fmt: skip
    no_bias = [RegHead(heads[0].states, heads[0].weight, None)]  # the head used above
    tloss = truth_lm_loss(hidden, weight, labels, no_bias, w, lam, "mean")
    assert _err(out2.loss, tloss) < 1e-5 and _err(out.loss, tloss) < 1e-5


def test_lm_loss_extreme_logits():
    """LM logits at ±1e4 that are *not* one-hot, head logits at ±50, exact fp32 inputs.

    Two groups of 16 tokens share an offset of ±1e4 (the row's sign picks the top one) plus
    dyadic O(1) parts, so p spreads over the top group; the head vetoes (−50) or approves (+50)
    a few tokens of each group, so the KL is O(0.1–1) and a KL bug shows. One label sits at −1e4
    (CE ≈ 2e4). All values are multiples of 2^-7 below 2^14, so fp32 holds ℓ exactly and the
    comparison sees only the kernel's arithmetic.
    """
    n, h, v = 6, 8, 150
    g = torch.Generator().manual_seed(9)

    def dyadic(*shape, scale=1.0, bits=6):
        k = int(scale * 2**bits)
        return torch.randint(-k, k + 1, shape, generator=g).double() / 2**bits

    perm = torch.randperm(v, generator=g)
    top_a, top_b = perm[:16], perm[16:32]
    hidden = dyadic(n, h, bits=1)
    hidden[:, 0] = torch.tensor([1.0, -1.0]).repeat(n // 2)
    weight = dyadic(v, h)
    weight[:, 0] = 0.0
    weight[top_a, 0], weight[top_b, 0] = 1e4, -1e4
    bias = torch.zeros(v, dtype=torch.float64)
    bias[torch.cat([top_a[:2], top_b[:2]])] = -50.0
    bias[torch.cat([top_a[2:4], top_b[2:4]])] = 50.0
    heads = [RegHead(dyadic(n, 4, bits=1), dyadic(v, 4, scale=2.0, bits=5), bias)]
    top = torch.where(hidden[:, :1] > 0, top_a, top_b)  # [n, 16]
    labels = top[torch.arange(n), torch.randint(0, 16, (n,), generator=g)]
    labels[1] = top_a[5]  # row 1's top group is B: ℓ_y = −1e4
    w = torch.tensor([0.75], dtype=torch.float64)
    lam = torch.rand(n, generator=g, dtype=torch.float64) * 2
    logits = hidden @ weight.T
    reg = torch.stack([hd.states @ hd.weight.T + hd.bias for hd in heads])
    tkl = truth_token_kl(logits, reg, w, None, None)
    assert 9e3 < logits.abs().max() < 1.1e4 and torch.softmax(logits, -1).amax(-1).max() < 0.6
    assert tkl.min() > 0.05  # a KL bug cannot hide in a KL of 1e-10
    args = (labels, _cast_heads(heads, torch.float32), w.float(), lam.float(), torch.tensor(1.0))
    out, gh, gw = _run_lm(regularized_lm_loss, hidden.float(), weight.float(), *args,
                          opts=LossOptions(chunk_size=4), config=SMALL)  # fmt: skip
    eout, egh, egw = _run_lm(eager.regularized_lm_loss, hidden.float(), weight.float(), *args,
                             opts=LossOptions())  # fmt: skip
    tloss, tgh, tgw = _run_lm(truth_lm_loss, hidden, weight, labels, heads, w, lam,
                              torch.tensor(1.0), reduction="mean")  # fmt: skip
    assert torch.isfinite(out.loss) and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    # exact inputs: the KL is O(1) sums over V in fp32 (a plain LSE(ℓ + log R) − LSE(ℓ) at
    # |ℓ| = 1e4 would be off by the ulp of 1e4, 1e-3); the loss, a mean of CEs up to 2e4, and the
    # gradients (the 1e4 column of W meets sums of p − q that cancel) are held to eager's error
    # with a floor of 1e-6 relative to their size
    assert _err(out.kl, tkl) < 1e-6
    assert _err(out.loss, tloss) <= 1.5 * _err(eout.loss, tloss) + 1e-6 * tloss.abs().item()
    assert _err(gh, tgh) <= 1.5 * _err(egh, tgh) + 1e-6 * tgh.abs().max().item()
    assert _err(gw, tgw) <= 1.5 * _err(egw, tgw) + 1e-6 * tgw.abs().max().item()


def test_lm_loss_bf16_within_eager_budget():
    # bf16 inputs, fp64 truth of the same bf16 values. eager upcasts and computes everything in
    # fp32; so does this path off CUDA (fp32 logits from upcast operands), so the budget is
    # eager's error with 10% slack for a different fp32 summation order, and the output
    # rounding to bf16 (half an ulp either way: one bf16 ulp) where eager happens to round well.
    hidden, weight, labels, heads, w, lam = _lm_inputs(17, 24, 300, 2, seed=11)

    def bf(x):
        return x.to(torch.bfloat16).to(DEVICE)

    args = (labels.to(DEVICE), _cast_heads(heads, torch.bfloat16), w.float().to(DEVICE),
            lam.float().to(DEVICE), torch.tensor(1.0, device=DEVICE))  # fmt: skip
    out, gh, gw = _run_lm(regularized_lm_loss, bf(hidden), bf(weight), *args,
                          opts=LossOptions(chunk_size=5), config=SMALL)  # fmt: skip
    eout, egh, egw = _run_lm(eager.regularized_lm_loss, bf(hidden), bf(weight), *args,
                             opts=LossOptions())  # fmt: skip
    tloss, tgh, tgw = _run_lm(
        truth_lm_loss, bf(hidden).double().cpu(), bf(weight).double().cpu(), labels,
        _cast_heads(heads, torch.bfloat16), w, lam, torch.tensor(1.0), reduction="mean",
    )  # fmt: skip
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    assert _err(out.loss, tloss) <= 1.1 * _err(eout.loss, tloss) + 1e-6  # fp32 scalars
    assert _err(gh, tgh) <= 1.1 * _err(egh, tgh) + _bf16_ulp(tgh)
    assert _err(gw, tgw) <= 1.1 * _err(egw, tgw) + _bf16_ulp(tgw)


# ----------------------------------------------------------------------------- head fit
def truth_head_fit(
    hidden, lm_weight, head_states, head_weight, head_bias, tokens, labels, mask, pair_mask, mu, red
):
    """fp64 NADO head loss from its formula (eager.head_fit_loss's docstring), by autograd;
    m_t = log E_p[σ(r_t)] as an explicit expectation, not the LSE difference the kernel uses."""
    logits = (hidden @ lm_weight.T).detach()
    r = head_states @ head_weight.T + (0 if head_bias is None else head_bias)
    pair = pair_mask
    a = r.gather(1, torch.where(mask, tokens, 0).view(-1, 1)).squeeze(1)
    bce = -(labels * F.logsigmoid(a) + (1 - labels) * F.logsigmoid(-a))
    m = (torch.softmax(logits, -1) * torch.sigmoid(r)).sum(-1).log()
    prev = F.pad(F.logsigmoid(a[:-1]), (1, 0))
    per = torch.where(mask, bce, 0 * bce) + mu * torch.where(pair, (prev - m) ** 2, 0 * m)
    if red == "none":
        return per
    return per.sum() if red == "sum" else per.sum() / mask.sum().clamp(min=1)


def _head_inputs(n, h, hk, v, *, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, sc=1.0):
        return torch.randn(*s, generator=g, dtype=torch.float64) * sc

    mask = torch.ones(n, dtype=torch.bool)
    mask[2::5] = False
    pair = torch.ones(n, dtype=torch.bool)
    pair[0] = False
    pair[n // 2 :: 7] = False  # a second sequence starts mid-batch
    return dict(
        hidden=rnd(n, h), lm_weight=rnd(v, h, sc=3 * h**-0.5),
        head_states=rnd(n, hk), head_weight=rnd(v, hk, sc=scale), head_bias=rnd(v, sc=scale),
        tokens=torch.randint(0, v, (n,), generator=g), labels=torch.rand(n, generator=g).double(),
        mask=mask, pair_mask=pair,
    )  # fmt: skip


def _run_head(fn, inp, grad_out, **kw):
    leaf = {k: inp[k].clone().requires_grad_() for k in ("head_states", "head_weight", "head_bias")}
    out = fn(**{**inp, **leaf}, **kw)
    loss = out if isinstance(out, torch.Tensor) else out.loss
    (loss * grad_out.to(loss.dtype)).sum().backward()
    return out, [leaf[k].grad for k in ("head_states", "head_weight", "head_bias")]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(("n", "v", "scale"), [(1, 33, 1.0), (17, 300, 1.0), (11, 130, 25.0)])
def test_head_fit_fp32_matches_fp64_truth(n, v, scale, reduction):
    # scale 25 puts head logits (and a_t) near ±50: σ saturates, logσ must not underflow
    inp = _head_inputs(n, 16, 8, v, seed=n + v, scale=scale)
    g = torch.Generator().manual_seed(2)
    grad_out = torch.randn(n, generator=g) if reduction == "none" else torch.tensor(0.6)
    f32 = {k: (x.float() if x.is_floating_point() else x).to(DEVICE) for k, x in inp.items()}
    out, grads = _run_head(head_fit_loss, f32, grad_out.to(DEVICE), mu=0.7,
                           opts=LossOptions(reduction=reduction, chunk_size=4), config=SMALL)  # fmt: skip
    tloss, tgrads = _run_head(truth_head_fit, inp, grad_out.double(), mu=0.7, red=reduction)
    # relative to the size of the result: at scale 25 the loss itself is O(100)
    size = max(1.0, tloss.abs().max().item())
    assert _err(out.loss, tloss) < 2e-5 * size
    for grad, tgrad in zip(grads, tgrads, strict=True):
        assert _err(grad, tgrad) < 2e-5 * max(1.0, tgrad.abs().max().item())
    assert out.n_tokens.item() == inp["mask"].sum().item()
    assert torch.all(out.consistency[~inp["pair_mask"].to(DEVICE)] == 0)
    assert torch.all(out.bce[~inp["mask"].to(DEVICE)] == 0)


def test_head_fit_matches_eager():
    # the same loss form as the losses helper's reference (not only as our own fp64 truth)
    inp = _head_inputs(9, 16, 8, 200, seed=21)
    f32 = {k: (x.float() if x.is_floating_point() else x) for k, x in inp.items()}
    out, grads = _run_head(head_fit_loss, f32, torch.tensor(1.0), mu=0.5, opts=LossOptions(),
                           config=SMALL)  # fmt: skip
    eout, egrads = _run_head(eager.head_fit_loss, f32, torch.tensor(1.0), mu=0.5,
                             opts=LossOptions())  # fmt: skip
    assert _err(out.loss, eout.loss) < 1e-5 and _err(out.consistency, eout.consistency) < 1e-5
    for grad, egrad in zip(grads, egrads, strict=True):
        assert _err(grad, egrad) < 1e-5


# ----------------------------------------------------------------------------- launch helpers
def test_triton_support_names_the_reason(monkeypatch):
    assert triton_support(DEVICE) == (True, "")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = triton_support("cpu")
    assert not ok and "TRITON_INTERPRET" in why
    ok, why = triton_support("meta")
    assert not ok and "meta" in why


def test_import_attrctl_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, attrctl, attrctl.kernels, attrctl.losses; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- GPU, real shapes
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_loss_gpu_model_shapes_match_eager(dtype):
    # SmolLM2-like head (H 576, V 49,152) at an odd N; fp32 vs eager to fp32 matmul noise,
    # bf16 within the plain bf16 path's budget plus one ulp (see the CPU budget test)
    n, h, v = 1031, 576, 49152
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*s, sc=1.0):
        return (torch.randn(*s, generator=g, device="cuda") * sc).to(dtype)

    hidden, weight = rnd(n, h), rnd(v, h, sc=h**-0.5 * 3)
    heads = [RegHead(rnd(n, h), rnd(v, h, sc=h**-0.5), rnd(v))]
    labels = torch.randint(0, v, (n,), generator=g, device="cuda")
    labels[::9] = -100
    w = torch.ones(1, device="cuda")
    lam = torch.rand(n, generator=g, device="cuda")
    one = torch.tensor(1.0, device="cuda")
    out, gh, gw = _run_lm(regularized_lm_loss, hidden, weight, labels, heads, w, lam, one,
                          opts=LossOptions())  # fmt: skip
    eout, egh, egw = _run_lm(eager.regularized_lm_loss, hidden, weight, labels, heads, w, lam,
                             one, opts=LossOptions())  # fmt: skip
    if dtype == torch.float32:
        # TF32 may be on for matmuls: compare at its 1e-3 relative precision
        assert _err(out.loss, eout.loss) < 1e-3 * eout.loss.abs().item()
        assert _err(gh, egh) < 1e-3 * egh.abs().max().item()
        assert _err(gw, egw) < 1e-3 * egw.abs().max().item()
    else:
        # both use fp32 logits; the kernel's gradient matmuls take the logits gradient in bf16
        # (tensor cores, fp32 output), so compare at a few bf16 ulps of the result
        assert _err(out.loss, eout.loss) < 4 * _bf16_ulp(eout.loss)
        assert _err(gh, egh) < 4 * _bf16_ulp(egh)
        assert _err(gw, egw) < 4 * _bf16_ulp(egw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_token_kl_gpu_large_vocab_matches_truth():
    n, v = 257, 128256  # Llama-3 vocabulary: 32 tiles of 4096 plus a ragged one
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(n, v, generator=g, device="cuda") * 4
    reg = torch.randn(1, n, v, generator=g, device="cuda") * 4
    w = torch.ones(1, device="cuda")
    grad_out = torch.randn(n, generator=g, device="cuda")
    kl, grad = _run_kl(token_kl, logits, reg, w, None, None, grad_out)
    tkl, tgrad = _run_kl(truth_token_kl, logits.double(), reg.double(), w.double(), None, None,
                         grad_out.double())  # fmt: skip
    # fp32 sums over 128k terms: relative error ~ sqrt(V)·2^-24 ≈ 2e-5 of O(1) quantities
    assert _err(kl, tkl) < 1e-4 and _err(grad, tgrad) < 1e-6
