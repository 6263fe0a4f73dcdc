"""Fused-linear losses in plain PyTorch: row chunks over the full vocabulary, fp32 compute.

Why row chunks and not a vocabulary tiling with an online log-sum-exp: the gradient of every
row needs the *final* LSEs (``p = exp(ℓ − lse_p)``), so a vocabulary-tiled pass has to compute
the logits twice (once for the LSEs, once for the gradient) — a third more matmul work. A row
chunk holds whole vocabulary rows instead, so one matmul gives the logits, the LSEs come from
the row sums of ``exp(ℓ − max ℓ)`` (in ``[1, V]``: the max entry is exactly 1), and the gradient
is written in place. The working set is three ``[C, V]`` fp32 buffers reused for every chunk
(one without heads), with ``C`` picked from a memory budget (:func:`pick_chunk_size`), so
memory is ``O(C·V + V·H)`` instead of eager's ``O(N·V)``: about 6 fp32 ``[N, V]`` tensors. At most
``C × V`` logits are live at once; when ``N ≤ C`` (N ≤ 336 at V = 49,152) the whole batch is one
chunk and its ``[N, V]`` logits *are* formed, in buffers no larger than the budget.

Per chunk of rows (``regularized_lm_loss``), with ``ws_t`` the row's weight in the reduced loss:

    B = Σ_k w_k logσ(s_k @ W_kᵀ + b_k)          log R            (addmm per head; A, T scratch)
    A = x @ Wᵀ − max ℓ                          ℓ, from its row max
    B −= ρ;  T = exp(A + B − max)               q·Σ_q            (ρ = log R at q's mode)
    A = exp(A)                                  p·Σ_p            (in place)
    lse = log Σ;  kl = E_q[B] − (lse_q − lse_p),  ce = lse_p − (ℓ_y − max ℓ)
    A = ws·((1+λ) p − λ q − onehot(y))          ∂loss/∂ℓ         (in place; 1/Σ in the row scales)
    grad_x = A @ W;  grad_W += Aᵀ @ x           (mm, addmm into one fp32 buffer)

Without heads (plain CE, λ irrelevant) only ``A`` is formed. What the regularizer adds over CE
is the head's addmm and these elementwise passes over ``[C, V]``, so they are counted: p and q
stay unnormalised (their 1/Σ folds into per-row scales, no normalising pass, no extra max pass)
and ``logσ`` is :func:`_log_sigmoid_` (torch's CPU kernel evaluates log1p per element, ~2.5×
slower).

The shifts cost three elementwise passes and keep every quantity of the size of a *difference*:
``max ℓ`` keeps ``ℓ + log R`` exact near the mode when ``|ℓ| ~ 1e4``, and ``ρ`` keeps the two
terms of the KL from each being as large as ``log R`` (−100 for two heads at r = −50), where
their fp32 difference lost ~1e-5 and reported negative KLs (see :func:`_anchored_kl`).

For ``reduction="mean"``/``"sum"`` the gradients are computed during the forward pass and
backward only multiplies them by the scalar ``grad_output``. For ``reduction="none"`` the row
weights are ``grad_output[t]``, unknown at forward time, and ``grad_W`` sums over rows, so the
forward computes only the loss and backward recomputes the pass with those weights (one more
logits matmul; documented trade-off).

Long: the forward and backward of every fused loss here share the chunk buffers, the chunk-size
budget and the in-place logσ / LSE helpers; split apart, they would reach into each other's
internals.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from attrctl.losses.types import HeadFitOutput, LossOptions, LossOutput, RegHead

#: Bytes for the three [C, V] fp32 working buffers. 192 MiB gives C = 336 rows at V = 49,152:
#: large enough that the per-chunk ``grad_W`` update (a read-modify-write of all of ``[V, H]``)
#: stays a small share of the time, small enough to be a fraction of eager's memory.
CHUNK_BUDGET_BYTES = 192 * 2**20
_N_BUFFERS = 3


def pick_chunk_size(n: int, v: int, chunk_size: int | None = None, h: int = 0) -> int:
    """Rows per chunk ``C``: ``min(chunk_size, n)`` if given, else the most rows, a multiple of 8
    and at least 8, whose three fp32 ``[C, V]`` buffers fit the budget ``B`` bytes:

        C = min(n, max(8, 8·⌊B / (3·4·V·8)⌋)),   B = max(CHUNK_BUDGET_BYTES, V·H)

    The budget is :data:`CHUNK_BUDGET_BYTES` (192 MiB), or a quarter of the fp32 ``[V, H]``
    weight gradient (``V·H`` bytes) when that is larger (Llama-3: 2 GiB → 512 MiB). The weight
    gradient has to exist anyway, and each chunk re-reads and re-writes all of it
    (``grad_W += Tᵀ x``), so at large ``V·H`` bigger chunks trade a small memory increase for far
    fewer passes over it.

    This is the memory bound of the chunked losses: at most ``C × V`` fp32 logits are live at
    once (with heads, two more ``[C, V]`` buffers: log R and q), whatever N is. C = 336 at
    SmolLM2's V = 49,152 (H 576) and at Llama-3's V = 128,256 (H 4,096; there B = V·H, so
    C ≈ H/12). When ``n ≤ C`` the whole batch is one chunk: its ``[N, V]`` logits (and head
    logits) are formed, once, in buffers no larger than ``B``; only for ``n > C`` does the pass
    avoid them. (``tests/test_chunked_memory.py`` checks the rule and the bound.)
    """
    if chunk_size is not None:
        return max(1, min(chunk_size, n))
    budget = max(CHUNK_BUDGET_BYTES, v * h)  # v·h·4 bytes / 4
    rows = budget // (_N_BUFFERS * 4 * max(v, 1))
    rows = max(8, rows - rows % 8)  # a multiple of 8 keeps the matmul tiles aligned
    return max(1, min(rows, n))


def _scaled(grad: torch.Tensor | None, grad_out: torch.Tensor) -> torch.Tensor | None:
    """``grad · grad_out`` for a scalar ``grad_out``, without a copy when it is exactly 1 (the
    usual ``loss.backward()``): a copy of a ``[V, H]`` gradient would double its memory."""
    if grad is None or (grad_out.numel() == 1 and grad_out.item() == 1.0):
        return grad
    return grad * grad_out.float()


def _lse_from_softmax(row_max: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """LSE of each row from its max and its softmax: ``lse = max − log(max softmax)``."""
    return row_max - probs.amax(-1).log()


def _anchored_kl(
    q: torch.Tensor,  # [C, V] q times its row sum q_sum
    log_r: torch.Tensor,  # [C, V] log R − ρ
    lse_q: torch.Tensor,  # [C] LSE(ℓ + log R) − (c + ρ)
    lse_p: torch.Tensor,  # [C] LSE(ℓ) − c
    q_sum: torch.Tensor,  # [C]
) -> torch.Tensor:  # [C]
    """KL(q ‖ p) = E_q[log R − ρ] − (lse_q − lse_p), the closed form (docs/design.md,
    "The regularizer in closed form") with log R     measured from ρ, its value at q's mode, and both LSEs from a common shift c.

    The closed form subtracts two terms that are each as large as log R itself: at log R ≈ −100
    (two heads at r = −50) fp32 rounds both to ~1e-5 and the difference, a KL of 0, came out
    −6e-5. Measured from ρ, both terms are of the size of log R's *variation* over q's mass, so a
    constant log R gives 0 − (0 − 0) and a KL near 0 keeps its fp32 relative precision. (q's
    mode, not p's: a head that vetoes p's mode, log R = −50 there and ≈ 0 elsewhere, would make
    both terms ≈ 50 for a KL of O(0.1).)
    """
    return torch.bmm(q.unsqueeze(1), log_r.unsqueeze(2)).view(-1) / q_sum - (lse_q - lse_p)


def _log_sigmoid_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """``x ← logσ(x)`` in place (``tmp``: scratch of x's shape), as ``min(x, 0) + log σ(|x|)``.

    σ(|x|) ∈ [½, 1] cannot underflow, so logσ(−200) = −200, never −inf; the absolute error is
    that of an fp32 log near 1 (≤ 6e-8). Two vectorized transcendental passes: torch's CPU
    ``log_sigmoid`` evaluates log1p element by element and also writes a [C, V] buffer for its
    backward; it took ~2.5× as long at the SmolLM2 shape.
    """
    torch.abs(x, out=tmp)
    torch.sigmoid(tmp, out=tmp)
    tmp.log_()
    return x.clamp_(max=0.0).add_(tmp)


def _log_r(
    heads: list[RegHead],
    attr_weights: torch.Tensor,
    s: int,
    e: int,
    out: torch.Tensor,
    tmp: torch.Tensor,
    tmp2: torch.Tensor,
) -> None:
    """Write ``Σ_k w_k logσ(r_k)`` of rows s:e into ``out`` ([C, V]); ``tmp``, ``tmp2`` scratch."""
    weights = attr_weights.tolist()
    for k, head in enumerate(heads):
        dst = out if k == 0 else tmp
        st = head.states[s:e].float()
        w = head.weight.float()
        if head.bias is None:
            torch.mm(st, w.t(), out=dst)
        else:
            torch.addmm(head.bias.float(), st, w.t(), out=dst)
        _log_sigmoid_(dst, tmp if k == 0 else tmp2)  # logσ(-50) = -50, never -inf
        if k == 0:
            if weights[0] != 1.0:
                dst.mul_(weights[0])
        else:
            out.add_(dst, alpha=weights[k])


def _reg_pass(
    hidden: torch.Tensor,  # [N, H]
    lm_weight: torch.Tensor,  # [V, H]
    labels: torch.Tensor,  # [N] int64, in range on every row passed
    heads: list[RegHead],
    attr_weights: torch.Tensor,  # [K]
    lam: torch.Tensor,  # [N] fp32
    row_weight: torch.Tensor | None,  # [N] fp32 weight of each row's loss; None = no gradients
    need_hidden: bool,
    need_weight: bool,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One fused pass over the given rows: per-row ce [N], kl [N] and optionally the gradients."""
    n, h = hidden.shape
    v = lm_weight.shape[0]
    dev = hidden.device
    ce = torch.zeros(n, dtype=torch.float32, device=dev)
    kl = torch.zeros(n, dtype=torch.float32, device=dev)
    grads = row_weight is not None and (need_hidden or need_weight)
    grad_h = torch.empty(n, h, dtype=torch.float32, device=dev) if grads and need_hidden else None
    grad_w = torch.zeros(v, h, dtype=torch.float32, device=dev) if grads and need_weight else None
    if n == 0:
        return ce, kl, grad_h, grad_w
    w32 = lm_weight.float()  # no copy for fp32 weights
    c = pick_chunk_size(n, v, chunk_size, h)
    a_buf = torch.empty(c, v, dtype=torch.float32, device=dev)
    if heads:  # without heads q = p: log R and q need no buffers
        b_buf = torch.empty(c, v, dtype=torch.float32, device=dev)
        t_buf = torch.empty(c, v, dtype=torch.float32, device=dev)
    for s in range(0, n, c):
        e = min(s + c, n)
        a = a_buf[: e - s]
        x = hidden[s:e].float()  # [C, H]
        y = labels[s:e].view(-1, 1)  # [C, 1]
        if heads:
            b, t = b_buf[: e - s], t_buf[: e - s]
            _log_r(heads, attr_weights, s, e, b, t, a)  # log R (t, a are scratch)
        torch.mm(x, w32.t(), out=a)  # ℓ
        a.sub_(a.amax(-1, keepdim=True))  # ℓ − max ℓ: exact near the max, however large ℓ is
        ell_y = a.gather(1, y).squeeze(1)  # ℓ_y − max ℓ
        if heads:
            j = torch.add(a, b, out=t).argmax(-1, keepdim=True)  # [C, 1] q's mode
            b.sub_(b.gather(1, j))  # log R − ρ, ρ = log R at q's mode (see _anchored_kl)
            torch.add(a, b, out=t)  # ℓ + log R − (max ℓ + ρ)
            m_q = t.amax(-1, keepdim=True)  # [C, 1]
            t.sub_(m_q).exp_()  # q·Σ: the same ops as p's below, so log R = const gives q = p
            sum_q = t.sum(-1)  # [C]
            lse_q = m_q.squeeze(1) + sum_q.log()  # LSE(ℓ + log R) − (max ℓ + ρ)
        a.exp_()  # p·Σexp: the max entry is exp(0) = 1, so the sum is in [1, V]
        sum_p = a.sum(-1)  # [C]
        lse_p = sum_p.log()  # LSE(ℓ) − max ℓ
        ce[s:e] = lse_p - ell_y
        if heads:
            kl[s:e] = _anchored_kl(t, b, lse_q, lse_p, sum_q)
        if not grads:
            continue
        ws = row_weight[s:e]
        # ∂loss/∂ℓ = ws·((1+λ) p − λ q − onehot(y)), built in a; p's normalisation folds into
        # the row scale (no pass of its own). Without heads q = p and λ does not matter.
        lam_ws = lam[s:e] * ws if heads else torch.zeros_like(ws)
        a.mul_(((ws + lam_ws) / sum_p).view(-1, 1))  # (1+λ)·ws·p
        if heads:
            a.addcmul_(t, (-lam_ws / sum_q).view(-1, 1))  # − λ·ws·q
        a.scatter_add_(1, y, (-ws).view(-1, 1))  # − ws·onehot(y)
        if grad_h is not None:
            torch.mm(a, w32, out=grad_h[s:e])
        if grad_w is not None:
            grad_w.addmm_(a.t(), x)
    return ce, kl, grad_h, grad_w


def _scatter_rows(n: int, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[n, ...] zeros with ``rows`` placed at ``idx`` (undo the compaction to counted rows)."""
    out = rows.new_zeros((n, *rows.shape[1:]))
    return out.index_copy_(0, idx, rows)


def _reduce(per_token: torch.Tensor, n_tokens: int, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_token
    total = per_token.sum()
    return total / max(n_tokens, 1) if reduction == "mean" else total


class _RegularizedLMLoss(torch.autograd.Function):
    """Autograd wrapper: tensors + frozen heads + one options object; returns (loss, ce, kl)."""

    @staticmethod
    def forward(ctx, hidden, lm_weight, labels, lam, attr_weights, heads, opts: LossOptions):
        n = hidden.shape[0]
        # compact to the counted rows: ignored tokens cost nothing and need no special casing
        idx = (labels != opts.ignore_index).nonzero().view(-1)
        n_tokens = idx.numel()
        sub_heads = [RegHead(hd.states[idx], hd.weight, hd.bias) for hd in heads]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        row_w = None
        if opts.reduction != "none" and (need_h or need_w):
            scale = 1.0 / max(n_tokens, 1) if opts.reduction == "mean" else 1.0
            row_w = torch.full((n_tokens,), scale, dtype=torch.float32, device=hidden.device)
        ce_v, kl_v, g_h, g_w = _reg_pass(
            hidden[idx], lm_weight, labels[idx], sub_heads, attr_weights, lam[idx], row_w,
            need_h, need_w, opts.chunk_size,
        )  # fmt: skip
        ce, kl = _scatter_rows(n, idx, ce_v), _scatter_rows(n, idx, kl_v)
        loss = _reduce(ce + lam * kl, n_tokens, opts.reduction)
        if opts.reduction == "none":
            # row weights = grad_output, unknown yet: keep the inputs and recompute in backward
            ctx.save_for_backward(hidden, lm_weight, labels, lam, attr_weights, idx)
            ctx.heads = sub_heads
        else:
            ctx.save_for_backward(g_h, g_w, idx)
        ctx.opts, ctx.n, ctx.dtypes = opts, n, (hidden.dtype, lm_weight.dtype)
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.opts.reduction == "none":
            hidden, lm_weight, labels, lam, attr_weights, idx = ctx.saved_tensors
            row_w = grad_loss.float()[idx]
            _, _, g_h, g_w = _reg_pass(
                hidden[idx], lm_weight, labels[idx], ctx.heads, attr_weights, lam[idx], row_w,
                need_h, need_w, ctx.opts.chunk_size,
            )  # fmt: skip
        else:
            # gradients were computed in the forward pass; backward only scales them
            g_h, g_w, idx = ctx.saved_tensors
            g_h, g_w = _scaled(g_h, grad_loss), _scaled(g_w, grad_loss)
        grad_hidden = _scatter_rows(ctx.n, idx, g_h).to(ctx.dtypes[0]) if need_h else None
        grad_weight = g_w.to(ctx.dtypes[1]) if need_w else None
        return grad_hidden, grad_weight, None, None, None, None, None


def regularized_lm_loss(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    labels: torch.Tensor,
    heads: list[RegHead],
    attr_weights: torch.Tensor,
    lam: torch.Tensor,
    opts: LossOptions,
) -> LossOutput:
    """Chunked ``CE + λ_t·KL(sg[q_t] ‖ p_t)``; same contract as :func:`attrctl.losses.eager`.

    Args:
        hidden: [N, H] final hidden states.
        lm_weight: [V, H] LM head weight.
        labels: [N] int64 (``opts.ignore_index`` = ignored).
        heads: K frozen heads.
        attr_weights: [K] fp32.
        lam: [N] fp32 per-token λ_t.
        opts: reduction, ignore_index, chunk_size.

    Returns:
        LossOutput; gradients flow to ``hidden`` and ``lm_weight``.
    """
    loss, ce, kl = _RegularizedLMLoss.apply(
        hidden, lm_weight, labels, lam, attr_weights, list(heads), opts
    )
    return LossOutput(loss, ce, kl, (labels != opts.ignore_index).sum())


# --------------------------------------------------------------------------- token_kl


def token_kl(
    logits: torch.Tensor,
    reg_logits: torch.Tensor,
    attr_weights: torch.Tensor,
    ref_logits: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Chunked KL(q_t ‖ p_t) per row from given logits; same contract as the eager one.

    The logits already exist here, so chunking only bounds the fp32 temporaries. The gradient
    ``p − q`` is computed during the forward pass (the ``[N, V]`` gradient has to exist anyway);
    backward scales its rows by ``grad_output``.

    Args:
        logits: [N, V]; reg_logits: [K, N, V]; attr_weights: [K] fp32;
        ref_logits: [N, V] or None; mask: [N] bool or None.

    Returns:
        [N] fp32.
    """
    return _TokenKL.apply(logits, reg_logits, attr_weights, ref_logits, mask)


def _kl_pass(logits, reg_logits, attr_weights, ref_logits, mask, need_grad):
    n, v = logits.shape
    kl = torch.zeros(n, dtype=torch.float32, device=logits.device)
    grad = torch.zeros(n, v, dtype=torch.float32, device=logits.device) if need_grad else None
    rows = torch.arange(n, device=logits.device) if mask is None else mask.nonzero().view(-1)
    c = pick_chunk_size(max(rows.numel(), 1), v)
    weights = attr_weights.tolist()
    for s in range(0, rows.numel(), c):
        idx = rows[s : s + c]
        ell = logits[idx].float()  # [C, V]
        log_r = torch.zeros_like(ell)
        for k, w in enumerate(weights):
            log_r.add_(F.logsigmoid(reg_logits[k, idx].float()), alpha=w)
        base = ell if ref_logits is None else ref_logits[idx].float()
        # softmax(base + log R) from both terms' values at q's mode j: sums of O(1) differences
        # instead of fp32 sums at |ℓ| ~ 1e4 or log R ~ −100 (see _anchored_kl)
        j = (base + log_r).argmax(-1, keepdim=True)  # [C, 1]
        z = base - base.gather(1, j)
        z.add_(log_r.sub_(log_r.gather(1, j)))
        log_q = torch.log_softmax(z, -1)
        q = log_q.exp()
        log_p = torch.log_softmax(ell, -1)
        # q = 0 entries (masked vocabulary, -inf logits) contribute 0, not 0·(−inf − −inf)
        terms = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q))
        kl[idx] = terms.sum(-1)
        if grad is not None:
            grad[idx] = log_p.exp_().sub_(q)  # p − q
    return kl, grad


class _TokenKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, reg_logits, attr_weights, ref_logits, mask):
        kl, grad = _kl_pass(
            logits, reg_logits, attr_weights, ref_logits, mask, ctx.needs_input_grad[0]
        )
        ctx.save_for_backward(grad)
        ctx.dtype = logits.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        (grad,) = ctx.saved_tensors
        return (grad * grad_kl.float().view(-1, 1)).to(ctx.dtype), None, None, None, None


# --------------------------------------------------------------------------- head_fit_loss


def _head_pass(
    hidden: torch.Tensor,  # [N, H] frozen LM input
    lm_weight: torch.Tensor,  # [V, H]
    states: torch.Tensor,  # [N, Hk]
    weight: torch.Tensor,  # [V, Hk]
    bias: torch.Tensor | None,  # [V]
    d_fn,  # m [C] , rows slice -> d [C]: ∂loss/∂m_t, or None for no gradients
    need: tuple[bool, bool, bool],
    chunk_size: int | None,
):
    """m_t = LSE(ℓ_t + logσ r_t) − LSE(ℓ_t) per row, and the gradient of Σ_t d_t·m_t.

    ``∂m_t/∂r_t[v] = π_t[v]·σ(−r_t[v])`` with ``π_t = softmax(ℓ_t + logσ r_t)``; the gradient
    ``G = d·π·σ(−r)`` is formed in place and pushed through the head's linear layer.
    """
    n, hk = states.shape
    v = lm_weight.shape[0]
    dev = hidden.device
    m = torch.zeros(n, dtype=torch.float32, device=dev)
    grads = d_fn is not None and any(need)
    g_s = torch.zeros(n, hk, dtype=torch.float32, device=dev) if grads and need[0] else None
    g_w = torch.zeros(v, hk, dtype=torch.float32, device=dev) if grads and need[1] else None
    g_b = torch.zeros(v, dtype=torch.float32, device=dev) if grads and need[2] else None
    if n == 0:
        return m, g_s, g_w, g_b
    w32, wh = lm_weight.float(), weight.float()
    b32 = None if bias is None else bias.float()
    c = pick_chunk_size(n, v, chunk_size, hk)
    a_buf, b_buf, t_buf = (torch.empty(c, v, dtype=torch.float32, device=dev) for _ in range(3))
    for s in range(0, n, c):
        e = min(s + c, n)
        a, r, t = a_buf[: e - s], b_buf[: e - s], t_buf[: e - s]
        x = states[s:e].float()  # [C, Hk]
        torch.mm(hidden[s:e].float(), w32.t(), out=a)  # ℓ
        if b32 is None:
            torch.mm(x, wh.t(), out=r)
        else:
            torch.addmm(b32, x, wh.t(), out=r)  # r
        m_p = a.amax(-1)
        torch.softmax(a, -1, out=t)
        lse_p = _lse_from_softmax(m_p, t)
        torch._C._nn.log_sigmoid(r, out=t)  # logσ r (finite for r = -50)
        a.add_(t)  # ℓ + logσ r
        m_q = a.amax(-1)
        torch.softmax(a, -1, out=a)  # π
        m[s:e] = _lse_from_softmax(m_q, a) - lse_p
        if not grads:
            continue
        t.sub_(r).exp_()  # logσ(r) − r = logσ(−r)  →  σ(−r)
        t.mul_(a).mul_(d_fn(m[s:e], s, e).view(-1, 1))  # G = d·π·σ(−r)
        if g_s is not None:
            torch.mm(t, wh, out=g_s[s:e])
        if g_w is not None:
            g_w.addmm_(t.t(), x)
        if g_b is not None:
            g_b.add_(t.sum(0))
    return m, g_s, g_w, g_b


def _pair_pass(hidden, lm_weight, states, weight, bias, pair, d_fn, need, chunk_size):
    """:func:`_head_pass` over the rows whose consistency counts (``pair``) only — m_t is read
    nowhere else, so the ``[rows, V]`` work of the other rows is skipped (a caller that estimates
    the consistency on a random subset of rows, as head fitting does, saves in proportion).
    ``d_fn(m_rows, sel)`` gets the selected rows' m and their indices into the full rows."""
    n = states.shape[0]
    sel = pair.nonzero().squeeze(1)  # [P]
    sub_d = None if d_fn is None else (lambda m_rows, s, e: d_fn(m_rows, sel[s:e]))
    m_p, g_sp, g_w, g_b = _head_pass(
        hidden[sel], lm_weight, states[sel], weight, bias, sub_d, need, chunk_size
    )
    m = torch.zeros(n, dtype=torch.float32, device=states.device)
    m[sel] = m_p
    g_s = None
    if g_sp is not None:
        g_s = torch.zeros(n, g_sp.shape[1], dtype=torch.float32, device=states.device)
        g_s[sel] = g_sp
    return m, g_s, g_w, g_b


class _HeadInputs(NamedTuple):
    """Everything the head-loss gradient needs, kept between forward and a recomputing backward."""

    hidden: torch.Tensor  # [N, H]
    lm_weight: torch.Tensor  # [V, H]
    states: torch.Tensor  # [N, Hk]
    weight: torch.Tensor  # [V, Hk]
    bias: torch.Tensor | None  # [V]
    tokens: torch.Tensor  # [N] int64
    labels: torch.Tensor  # [N] fp32
    mask: torch.Tensor  # [N] bool
    pair: torch.Tensor  # [N] bool
    a: torch.Tensor  # [N] head logit of the taken token
    prev: torch.Tensor  # [N] logσ(a_{t−1})
    mu: float
    need: tuple[bool, bool, bool]
    chunk_size: int | None


def _head_grads(inp: _HeadInputs, row_w: torch.Tensor):
    """All head gradients for row weights ``row_w`` [N] (∂reduced loss/∂loss_t)."""
    (
        hidden,
        lm_weight,
        states,
        weight,
        bias,
        tokens,
        labels,
        mask,
        pair,
        a,
        prev,
        mu,
        need,
        chunk,
    ) = inp
    mu2 = 2.0 * mu
    pair_f = pair.float()

    def d_fn(m_rows, rows):
        # ∂(μ·pair·(prev − m)²)/∂m = −2μ·(prev − m) on the pair rows
        return -mu2 * (prev[rows] - m_rows) * row_w[rows]

    m, g_s, g_w, g_b = _pair_pass(hidden, lm_weight, states, weight, bias, pair, d_fn, need, chunk)
    # ∂loss/∂a_t: BCE of row t, and the consistency of row t+1 through logσ(a_t)
    c = mask.float() * (torch.sigmoid(a) - labels) * row_w
    nxt = mu2 * pair_f[1:] * (prev[1:] - m[1:]) * row_w[1:]
    c[:-1] += nxt * torch.sigmoid(-a[:-1])
    wh_tok = weight.float()[tokens]  # [N, Hk]
    if g_s is not None:
        g_s.addcmul_(wh_tok, c.view(-1, 1))
    if g_w is not None:
        g_w.index_add_(0, tokens, states.float() * c.view(-1, 1))
    if g_b is not None:
        g_b.index_add_(0, tokens, c)
    return m, g_s, g_w, g_b


class _HeadFitLoss(torch.autograd.Function):
    """Autograd wrapper; returns (loss, bce, consistency)."""

    @staticmethod
    def forward(ctx, states, weight, bias, hidden, lm_weight, tokens, labels, mask, pair, mu, opts):
        n = states.shape[0]
        # the head's logit for the taken token needs one row of W per token, not the vocabulary
        a = (states.float() * weight.float()[tokens]).sum(-1)  # [N]
        if bias is not None:
            a = a + bias.float()[tokens]
        prev = torch.cat([a.new_zeros(1), F.logsigmoid(a[:-1])])  # logσ(a_{t−1})
        need = tuple(ctx.needs_input_grad[:3])
        vals = _HeadInputs(
            hidden, lm_weight, states, weight, bias, tokens, labels, mask, pair, a, prev, mu, need,
            opts.chunk_size,
        )  # fmt: skip
        n_tokens = int(mask.sum())
        if opts.reduction != "none" and any(need):
            scale = 1.0 / max(n_tokens, 1) if opts.reduction == "mean" else 1.0
            row_w = torch.full((n,), scale, dtype=torch.float32, device=states.device)
            m, g_s, g_w, g_b = _head_grads(vals, row_w)
            ctx.save_for_backward(g_s, g_w, g_b)
        else:
            m, *_ = _pair_pass(
                hidden, lm_weight, states, weight, bias, pair, None, need, opts.chunk_size
            )
            ctx.vals = vals
        bce = F.binary_cross_entropy_with_logits(a, labels, reduction="none") * mask
        cons = (prev - m).square_() * pair
        loss = _reduce(bce + mu * cons, n_tokens, opts.reduction)
        ctx.opts = opts
        ctx.dtypes = (states.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(bce, cons)
        return loss, bce, cons

    @staticmethod
    def backward(ctx, grad_loss, _g_bce, _g_cons):
        if ctx.opts.reduction == "none":
            _, g_s, g_w, g_b = _head_grads(ctx.vals, grad_loss.float())
        else:
            g_s, g_w, g_b = (_scaled(g, grad_loss) for g in ctx.saved_tensors)
        out = [
            None if g is None else g.to(dt)
            for g, dt in zip((g_s, g_w, g_b), ctx.dtypes, strict=True)
        ]
        return (*out, None, None, None, None, None, None, None, None)


def head_fit_loss(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    head_states: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    pair_mask: torch.Tensor,
    mu: float,
    opts: LossOptions,
) -> HeadFitOutput:
    """Chunked NADO head loss; same contract and maths as :func:`attrctl.losses.eager`.

    The BCE term and the ``logσ(a_{t−1})`` side of the consistency need only the taken token's
    row of the head, so they (and their gradients) are O(N·Hk); only ``m_t`` walks the vocabulary.
    """
    loss, bce, cons = _HeadFitLoss.apply(
        head_states, head_weight, head_bias, hidden, lm_weight, tokens, labels, mask, pair_mask,
        mu, opts,
    )  # fmt: skip
    return HeadFitOutput(loss, bce, cons, mask.sum())
