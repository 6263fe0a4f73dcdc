"""Fused-linear NADO head loss: BCE on the taken token + μ·consistency, without [N, V] tensors.

Maths (row t, frozen LM logits ℓ_t = h_t Wᵀ, head logits r_t = s_t Uᵀ + b, taken token x_{t+1}):

    a_t   = r_t[x_{t+1}]                                  (the head's logit for the token taken)
    m_t   = log E_{p_t}[σ(r_t)] = LSE(ℓ_t + logσ r_t) − LSE(ℓ_t)
    loss_t = mask_t · BCE(a_t, y_t) + μ · pair_t · (logσ(a_{t−1}) − m_t)²

    ∂m_t/∂r_t[v] = q_t[v] (1 − σ(r_t[v])),   q_t = softmax(ℓ_t + logσ r_t)
    ∂loss/∂a_t   = mask_t (σ(a_t) − y_t) + 2μ pair_{t+1} (logσ(a_t) − m_{t+1}) (1 − σ(a_t))

This matches ``attrctl.losses.eager.head_fit_loss`` term for term (rows off ``mask`` take
a_t from token 0, as there). Split of the work:

* a_t needs one dot product per row (s_t · U[x_{t+1}] + b[x_{t+1}]), done in torch in fp32
  before the sweep, so each row's kernel program knows logσ(a_{t−1}).
* ``_head_fit_kernel`` (one program per row of a chunk) sweeps the row twice: the two-LSE pass of
  ``_math`` gives m_t; the gradient pass overwrites the head-logits chunk with
  ``c_t · q_t (1 − σ(r_t))``, c_t = −2μ·pair_t·scale_t·(logσ(a_{t−1}) − m_t). Rows with
  pair_t = False skip the first sweep and write zeros.
* torch matmuls turn that chunk gradient into ∂L/∂s, ∂L/∂U, ∂L/∂b; after the last chunk, the
  gradient through a_t (which needs m_{t+1} from the next row) is added with index_add.

Memory and traffic: the same argument as ``fused_linear_reg``: fp32 [C, V] LM and head logits
per chunk, read twice by the kernel, the head logits written once; the frozen LM gets no gradient.
``reduction="none"`` with a per-row grad_output re-runs the chunk loop in backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from attrctl.kernels._math import log_sigmoid, safe, safe_log, two_lse_step
from attrctl.kernels._utils import (
    KernelConfig,
    fast_fp32_matmul,
    mm_f32,
    pick_block_v,
    pick_chunk_rows,
    pick_num_warps,
)

from attrctl.losses.types import HeadFitOutput, LossOptions


@triton.jit
def _head_fit_kernel(
    logits_ptr,  # [C, V] frozen LM logits of the chunk
    logits_stride,
    reg_ptr,  # [C, V] head logits r; overwritten with ∂L/∂r if COMPUTE_GRAD
    reg_stride,
    prev_ptr,  # [C] fp32 logσ(a_{t−1}) (any value where pair is 0)
    pair_ptr,  # [C] int8 pair_t: the consistency term of row t counts
    coef_ptr,  # [C] fp32 μ · scale_t (scale = reduction factor × grad_output)
    m_ptr,  # [C] fp32 out: m_t = LSE(ℓ + logσ r) − LSE(ℓ) (0 where pair is 0)
    V,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    paired = tl.load(pair_ptr + row) != 0
    l_row = logits_ptr + row * logits_stride
    r_row = reg_ptr + row * reg_stride
    ninf = float("-inf")

    n_cols = tl.where(paired, V, 0)
    m_p = tl.full((), ninf, tl.float32)
    beta = tl.full((), ninf, tl.float32)  # anchor of π = softmax(ℓ + logσ r) (see _math)
    rho = tl.zeros((), tl.float32)
    d_p = tl.zeros((), tl.float32)
    d_q = tl.zeros((), tl.float32)
    e_q = tl.zeros((), tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        col_mask = offs < V
        lg = tl.load(l_row + offs, mask=col_mask, other=ninf).to(tl.float32)
        r = tl.load(r_row + offs, mask=col_mask, other=0.0).to(tl.float32)
        log_r = log_sigmoid(r)
        m_p, d_p, beta, rho, d_q, e_q = two_lse_step(
            lg, lg, log_r, m_p, d_p, beta, rho, d_q, e_q, False, BLOCK_V
        )
    m_p = safe(m_p)
    beta = safe(beta)
    log_dp = safe_log(d_p)
    log_dq = safe_log(d_q)
    # m = LSE(ℓ + logσ r) − LSE(ℓ) = (β − m_p) + ρ + log d_q − log d_p
    m = tl.where(paired, ((beta - m_p) + rho) + (log_dq - log_dp), 0.0)
    tl.store(m_ptr + row, m)

    if COMPUTE_GRAD:
        prev = tl.load(prev_ptr + row)
        coef = tl.where(paired, -2.0 * tl.load(coef_ptr + row) * (prev - m), 0.0)
        n_read = tl.where(coef != 0.0, V, 0)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            col_mask = offs < V
            read_mask = offs < n_read
            lg = tl.load(l_row + offs, mask=read_mask, other=ninf).to(tl.float32)
            r = tl.load(r_row + offs, mask=read_mask, other=0.0).to(tl.float32)
            ls = log_sigmoid(r)
            # q (1 − σ(r)) = exp((ℓ − β) + (logσ r − ρ) − log d_q) · exp(logσ r − r)
            g = coef * tl.exp((lg - beta) + (ls - rho) - log_dq + (ls - r))
            g = tl.where(read_mask, g, 0.0)
            tl.store(r_row + offs, g.to(reg_ptr.dtype.element_ty), mask=col_mask)


@dataclass(frozen=True)
class HeadFitOptions:
    """Non-tensor inputs of :class:`HeadFitFunction`."""

    mu: float
    loss: LossOptions
    kernel: KernelConfig


def _taken_logit(
    states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tok: torch.Tensor
) -> torch.Tensor:  # [N] fp32
    a = (states.float() * weight[tok].float()).sum(-1)
    return a if bias is None else a + bias[tok].float()


def head_fit_forward(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    states: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    pair_mask: torch.Tensor,
    row_scale: torch.Tensor | None,
    opts: HeadFitOptions,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """Chunk loop: per-row BCE and consistency always; head gradients when ``row_scale`` is given.

    Args:
        hidden: [N, H] frozen.  lm_weight: [V, H] frozen.
        states: [N, Hk].  weight: [V, Hk].  bias: [V] or None.
        tokens: [N] int64.  labels: [N] fp32.  mask, pair_mask: [N] bool.
        row_scale: [N] fp32 gradient scale per row, or None for the loss only.
        opts: μ, loss and launch options.
        needs: which of (states, weight, bias) need a gradient.

    Returns:
        ``(bce [N], cons [N], (grad_states, grad_weight, grad_bias))``, gradients or None.
    """
    n, h = hidden.shape
    v, hk = weight.shape
    device = hidden.device
    compute_grad = row_scale is not None and any(needs)
    tok = torch.where(mask, tokens, torch.zeros_like(tokens))
    a = _taken_logit(states, weight, bias, tok)  # [N]
    prev = torch.cat([a.new_zeros(1), F.logsigmoid(a[:-1])])  # logσ(a_{t−1}); unused at t=0
    m = torch.zeros(n, device=device, dtype=torch.float32)
    scale = row_scale if row_scale is not None else torch.zeros(n, device=device)
    scale = scale.to(torch.float32).contiguous()
    coef = (opts.mu * scale).contiguous()
    pair_i8 = pair_mask.to(torch.int8).contiguous()
    g_states = (  # fp32 until backward casts: the a_t term below is added to the chunk term
        torch.zeros(n, hk, device=device, dtype=torch.float32)
        if compute_grad and needs[0]
        else None
    )
    g_weight = (
        torch.zeros(v, hk, device=device, dtype=torch.float32)
        if compute_grad and needs[1]
        else None
    )
    g_bias = (
        torch.zeros(v, device=device, dtype=torch.float32) if compute_grad and needs[2] else None
    )
    chunk = pick_chunk_rows(n, v, max(h, hk), opts.loss.chunk_size)
    block_v = pick_block_v(v, opts.kernel)
    num_warps = pick_num_warps(block_v, opts.kernel)
    fast = fast_fp32_matmul(states)
    # fp32 logits as in fused_linear_reg; the portable path upcasts each weight once
    lm_w = lm_weight.to(hidden.dtype) if fast else lm_weight.float()
    u = weight.to(states.dtype) if fast else weight.float()
    b32 = None if bias is None else bias.float()
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        s_c = states[start:end].to(u.dtype)  # [C, Hk]
        logits = mm_f32(hidden[start:end].to(lm_w.dtype), lm_w.T, fast)  # [C, V] frozen LM
        r = mm_f32(s_c, u.T, fast)  # [C, V] fp32, overwritten with ∂L/∂r
        if b32 is not None:
            r += b32
        _head_fit_kernel[(end - start,)](
            logits, logits.stride(0), r, r.stride(0), prev[start:end], pair_i8[start:end],
            coef[start:end], m[start:end], v,
            COMPUTE_GRAD=compute_grad, BLOCK_V=block_v, num_warps=num_warps,
        )  # fmt: skip
        if not compute_grad:
            continue
        if g_bias is not None:
            g_bias += r.sum(0)
        g_r = r.to(u.dtype)  # the fast path's matmuls take the input dtype
        if g_states is not None:
            g_states[start:end] = mm_f32(g_r, u, fast)  # [C, V] @ [V, Hk]
        if g_weight is not None:
            g_weight += mm_f32(g_r.T, s_c, fast)  # [V, C] @ [C, Hk]
    bce = F.binary_cross_entropy_with_logits(a, labels.float(), reduction="none")
    bce = torch.where(mask, bce, torch.zeros_like(bce))
    cons = torch.where(pair_mask, (prev - m) ** 2, torch.zeros_like(m))
    if compute_grad:
        # gradient through a_t: its own BCE and the consistency of row t+1 (which reads a_t)
        nxt = torch.zeros_like(a)
        nxt[:-1] = (2.0 * opts.mu * scale * pair_mask * (prev - m))[1:]
        ga = scale * mask * (torch.sigmoid(a) - labels.float()) + nxt * torch.sigmoid(-a)  # [N]
        if g_states is not None:
            g_states += ga[:, None] * weight[tok].float()
        if g_weight is not None:
            g_weight.index_add_(0, tok, ga[:, None] * states.float())
        if g_bias is not None:
            g_bias.index_add_(0, tok, ga)
    return bce, cons, (g_states, g_weight, g_bias)


class HeadFitFunction(torch.autograd.Function):
    """NADO head loss; gradients to the head's states, weight and bias (the LM is frozen)."""

    @staticmethod
    def forward(
        ctx, hidden, lm_weight, states, weight, bias, tokens, labels, mask, pair_mask, opts
    ):
        # shapes: hidden [N, H], lm_weight [V, H], states [N, Hk], weight [V, Hk], bias [V]|None,
        # tokens [N] int64, labels [N] fp32, mask/pair_mask [N] bool
        needs = (ctx.needs_input_grad[2], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
        n_tokens = mask.sum()
        eager_grads = opts.loss.reduction != "none" and any(needs)
        row_scale = None
        if eager_grads:
            factor = 1.0 if opts.loss.reduction == "sum" else 1.0 / n_tokens.clamp(min=1)
            row_scale = torch.ones(mask.shape[0], device=mask.device) * factor
        bce, cons, grads = head_fit_forward(
            hidden, lm_weight, states, weight, bias, tokens, labels, mask, pair_mask,
            row_scale, opts, needs,
        )  # fmt: skip
        per_row = bce + opts.mu * cons
        if opts.loss.reduction == "none":
            loss = per_row
        elif opts.loss.reduction == "sum":
            loss = per_row.sum()
        else:
            loss = per_row.sum() / n_tokens.clamp(min=1)
        ctx.mark_non_differentiable(bce, cons)
        ctx.opts, ctx.needs, ctx.eager_grads = opts, needs, eager_grads
        ctx.dtypes = (states.dtype, weight.dtype, None if bias is None else bias.dtype)
        if eager_grads:
            ctx.save_for_backward(*grads)
        else:
            ctx.save_for_backward(
                hidden, lm_weight, states, weight, bias, tokens, labels, mask, pair_mask
            )
        return loss, bce, cons

    @staticmethod
    def backward(ctx, grad_loss, _grad_bce, _grad_cons):
        if ctx.eager_grads:
            grads = ctx.saved_tensors
            if grad_loss.item() != 1.0:  # loss.backward() passes exactly 1
                grads = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in grads)
        else:
            saved = ctx.saved_tensors
            _, _, grads = head_fit_forward(
                *saved, grad_loss.to(torch.float32).expand(saved[0].shape[0]), ctx.opts, ctx.needs
            )
        out = tuple(
            None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes, strict=True)
        )
        return None, None, *out, None, None, None, None, None


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
    config: KernelConfig | None = None,
) -> HeadFitOutput:
    """The NADO head loss with Triton (inputs normalised by ``attrctl.losses``).

    Args:
        hidden: [N, H] frozen LM hidden states.  lm_weight: [V, H] frozen LM head.
        head_states: [N, Hk].  head_weight: [V, Hk].  head_bias: [V] or None.
        tokens: [N] int64 token taken at row t.  labels: [N] fp32 in [0, 1].
        mask: [N] bool rows whose BCE counts.  pair_mask: [N] bool rows whose consistency counts.
        mu: consistency weight.  opts: reduction, chunk_size.  config: launch parameters.

    Returns:
        HeadFitOutput(loss, bce [N], consistency [N], n_tokens); gradients to the head.
    """
    hopts = HeadFitOptions(float(mu), opts, config or KernelConfig())
    loss, bce, cons = HeadFitFunction.apply(
        hidden, lm_weight, head_states, head_weight, head_bias, tokens, labels, mask, pair_mask,
        hopts,
    )  # fmt: skip
    return HeadFitOutput(loss, bce, cons, mask.sum())
