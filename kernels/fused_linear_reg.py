"""Fused-linear CE + λ·KL(sg[q] ‖ p): the regularized LM loss without the [N, V] logits.

Maths (row t, ℓ_t = h_t Wᵀ, r_{k,t} = s_{k,t} W_kᵀ + b_k, λ_t per token, y_t the label):

    loss_t   = CE(ℓ_t, y_t) + λ_t · KL(sg[q_t] ‖ p_t),   q_t = softmax(sg[ℓ_t] + Σ_k w_k logσ r_{k,t})
    CE_t     = LSE(ℓ_t) − ℓ_t[y_t]
    ∂loss_t/∂ℓ_t = (1 + λ_t) p_t − onehot(y_t) − λ_t q_t
    ∂L/∂h    = G W,   ∂L/∂W = Gᵀ h,   G = [∂L/∂ℓ_t]_t scaled by the reduction

Per row chunk of C rows, torch matmuls build the chunk's LM logits [C, V] and head logits
[K, C, V] in fp32 (bf16/fp16 inputs: ``torch.mm(..., out_dtype=float32)`` on CUDA builds that
have it, which keeps tensor-core speed; otherwise the operands are upcast); then
``_fused_reg_lm_kernel`` (one program per row) sweeps the row twice: the online two-LSE pass of
``_math`` gives CE and KL (in its anchored form, which does not cancel when log R is large and
nearly constant), and the gradient pass overwrites the logits chunk in place with its
gradient. Two more matmuls turn it into ∂L/∂h for the chunk and accumulate ∂L/∂W in an fp32
buffer. The gradients are thus computed during the forward call; backward only multiplies them
by grad_output (skipped when it is 1). fp32 logits are what makes this path as accurate as
``eager``: rounding a logit of magnitude 30 to bf16 moves it by up to 0.06.

``reduction="none"`` with a per-token grad_output cannot reuse gradients built with a uniform
scale (∂L/∂W mixes rows), so that case keeps only the loss in forward and re-runs the chunk loop
in backward with the row scales set to grad_output (one extra forward matmul per chunk).

Memory: the whole batch never holds [N, V]; at a time there are (1 + K)·C·V fp32 logits, the
fp32 [V, H] gradient accumulator (plus an fp32 copy of W on the portable path) and [N, H]
gradients. With C ≈ N·H/V (``_utils.pick_chunk_rows``) the chunk logits are about the size of
the hidden states. The kernel reads each logit and head logit twice and writes the logits once:
~(3 + 2K)·C·V·4 bytes per chunk, against an eager path's ~10 fp32 [N, V] tensors, each written
and read at least once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from attrctl.kernels._math import log_r_tile, safe, safe_log, two_lse_step
from attrctl.kernels._utils import (
    KernelConfig,
    fast_fp32_matmul,
    mm_f32,
    pick_block_v,
    pick_chunk_rows,
    pick_num_warps,
)

from attrctl.losses.types import LossOptions, LossOutput, RegHead


@triton.jit
def _fused_reg_lm_kernel(
    logits_ptr,  # [C, V] LM logits of the chunk; overwritten with ∂loss/∂ℓ if COMPUTE_GRAD
    logits_stride,
    reg_ptr,  # [K, C, V] head logits, unit stride along V
    reg_stride_k,
    reg_stride_n,
    w_ptr,  # [K] fp32 attribute weights
    labels_ptr,  # [C] int64 next-token labels
    lam_ptr,  # [C] fp32 λ_t
    scale_ptr,  # [C] fp32 gradient scale of each row (reduction factor × grad_output)
    ce_ptr,  # [C] fp32 out: CE_t (0 on ignored rows)
    kl_ptr,  # [C] fp32 out: KL_t (0 on ignored rows)
    V,
    K,
    ignore_index,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    l_row = logits_ptr + row * logits_stride
    r_row = reg_ptr + row * reg_stride_n
    ninf = float("-inf")

    # pass 1: online two-LSE over the row (skipped on ignored rows)
    n_cols = tl.where(valid, V, 0)
    m_p = tl.full((), ninf, tl.float32)
    beta = tl.full((), ninf, tl.float32)  # q's anchor (see _math): none yet
    rho = tl.zeros((), tl.float32)
    d_p = tl.zeros((), tl.float32)
    d_q = tl.zeros((), tl.float32)
    e_q = tl.zeros((), tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        col_mask = offs < V
        lg = tl.load(l_row + offs, mask=col_mask, other=ninf).to(tl.float32)
        log_r = log_r_tile(r_row, reg_stride_k, w_ptr, offs, col_mask, K, BLOCK_V)
        m_p, d_p, beta, rho, d_q, e_q = two_lse_step(
            lg, lg, log_r, m_p, d_p, beta, rho, d_q, e_q, False, BLOCK_V
        )

    safe_label = tl.where(valid, label, 0)
    l_y = tl.load(l_row + safe_label, mask=valid, other=0.0).to(tl.float32)
    m_p = safe(m_p)
    beta = safe(beta)
    log_dp = safe_log(d_p)
    log_dq = safe_log(d_q)
    ce = (m_p - l_y) + log_dp  # LSE(ℓ) − ℓ_y without adding two large numbers
    # E_q[log R − ρ] − (LSE(ℓ + log R − ρ) − LSE(ℓ)): no term of the size of log R (see _math)
    kl = e_q / tl.where(valid, d_q, 1.0) - (beta - m_p) - log_dq + log_dp
    tl.store(ce_ptr + row, tl.where(valid, ce, 0.0))
    tl.store(kl_ptr + row, tl.where(valid, kl, 0.0))

    if COMPUTE_GRAD:
        # pass 2: ∂/∂ℓ = s·((1+λ)p − onehot − λq), written over ℓ (zeros on ignored rows)
        lam = tl.load(lam_ptr + row)
        s = tl.where(valid, tl.load(scale_ptr + row), 0.0)
        n_read = tl.where(s != 0.0, V, 0)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            col_mask = offs < V
            read_mask = offs < n_read
            lg = tl.load(l_row + offs, mask=read_mask, other=ninf).to(tl.float32)
            log_r = log_r_tile(r_row, reg_stride_k, w_ptr, offs, read_mask, K, BLOCK_V)
            p = tl.exp((lg - m_p) - log_dp)
            q = tl.exp((lg - beta) + (log_r - rho) - log_dq)  # differences first, as in _math
            grad = (1.0 + lam) * p - lam * q - tl.where(offs == label, 1.0, 0.0)
            grad = tl.where(read_mask, s * grad, 0.0)
            tl.store(l_row + offs, grad.to(logits_ptr.dtype.element_ty), mask=col_mask)


@dataclass(frozen=True)
class FusedRegOptions:
    """Non-tensor inputs of :class:`FusedRegLMFunction`."""

    loss: LossOptions
    kernel: KernelConfig


def _head_logits(heads: list[RegHead], start: int, end: int, fast: bool, out: torch.Tensor) -> None:
    """Write r_k = s_k Wₖᵀ + b_k for rows [start, end) into the fp32 buffer ``out`` [K, C, V]."""
    for k, head in enumerate(heads):
        dst = out[k, : end - start]  # [C, V]
        dst.copy_(mm_f32(head.states[start:end], head.weight.T, fast))
        if head.bias is not None:
            dst += head.bias.float()


def fused_reg_lm_forward(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    labels: torch.Tensor,
    heads: list[RegHead],
    attr_weights: torch.Tensor,
    lam: torch.Tensor,
    row_scale: torch.Tensor | None,
    opts: FusedRegOptions,
    need_hidden_grad: bool,
    need_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Walk the rows in chunks; losses always, gradients when asked.

    Args:
        hidden: [N, H].
        lm_weight: [V, H].
        labels: [N] int64.
        heads: K frozen heads.
        attr_weights: [K] fp32.
        lam: [N] fp32.
        row_scale: [N] fp32 gradient scale per row (None when no gradient is needed).
        opts: loss and launch options.
        need_hidden_grad: compute ∂L/∂hidden.
        need_weight_grad: compute ∂L/∂lm_weight.

    Returns:
        ``(ce [N] fp32, kl [N] fp32, grad_hidden [N, H] | None, grad_weight [V, H] fp32 | None)``.
    """
    n, h = hidden.shape
    v = lm_weight.shape[0]
    k = len(heads)
    device = hidden.device
    compute_grad = row_scale is not None and (need_hidden_grad or need_weight_grad)
    ce = torch.zeros(n, device=device, dtype=torch.float32)
    kl = torch.zeros(n, device=device, dtype=torch.float32)
    grad_hidden = torch.zeros_like(hidden) if compute_grad and need_hidden_grad else None
    # fp32 accumulator over chunks: summing many bf16 partial products would round each time
    grad_weight = (
        torch.zeros(v, h, device=device, dtype=torch.float32)
        if compute_grad and need_weight_grad
        else None
    )
    if n == 0:
        return ce, kl, grad_hidden, grad_weight
    fast = fast_fp32_matmul(hidden)
    # portable path: upcast the weight once (not per chunk); the fast path reads it as is
    weight = lm_weight.to(hidden.dtype) if fast else lm_weight.float()
    chunk = pick_chunk_rows(n, v, h, opts.loss.chunk_size)
    block_v = pick_block_v(v, opts.kernel)
    num_warps = pick_num_warps(block_v, opts.kernel)
    w32 = attr_weights.to(device=device, dtype=torch.float32).contiguous()
    labels = labels.contiguous()
    lam = lam.to(torch.float32).contiguous()
    scale = lam if row_scale is None else row_scale.to(torch.float32).contiguous()
    reg = torch.empty((max(k, 1), chunk, v), device=device, dtype=torch.float32)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        h_c = hidden[start:end]  # [C, H]
        logits = mm_f32(h_c, weight.T, fast)  # [C, V] fp32, overwritten with its gradient
        _head_logits(heads, start, end, fast, reg)
        _fused_reg_lm_kernel[(end - start,)](
            logits, logits.stride(0), reg, reg.stride(0), reg.stride(1), w32,
            labels[start:end], lam[start:end], scale[start:end], ce[start:end], kl[start:end],
            v, k, opts.loss.ignore_index,
            COMPUTE_GRAD=compute_grad, BLOCK_V=block_v, num_warps=num_warps,
        )  # fmt: skip
        if not compute_grad:
            continue
        # fast path: the logits gradient enters the matmuls in the input dtype, as autograd
        # would hand it to a bf16 LM head; portable path: everything stays fp32
        g_c = logits.to(weight.dtype)
        if grad_hidden is not None:
            grad_hidden[start:end] = mm_f32(g_c, weight, fast)  # [C, V] @ [V, H]
        if grad_weight is not None:
            grad_weight += mm_f32(g_c.T, h_c.to(weight.dtype), fast)  # [V, C] @ [C, H]
    return ce, kl, grad_hidden, grad_weight


class FusedRegLMFunction(torch.autograd.Function):
    """Fused-linear CE + λ·KL; gradients to ``hidden`` and ``lm_weight`` only (heads are frozen)."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,  # [N, H]
        lm_weight: torch.Tensor,  # [V, H]
        labels: torch.Tensor,  # [N] int64
        attr_weights: torch.Tensor,  # [K] fp32
        lam: torch.Tensor,  # [N] fp32
        heads: list[RegHead],  # frozen: autograd does not see tensors inside the list
        opts: FusedRegOptions,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        valid = labels != opts.loss.ignore_index
        n_tokens = valid.sum()
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        eager_grads = opts.loss.reduction != "none" and (need_h or need_w)
        row_scale = None
        if eager_grads:
            factor = 1.0 if opts.loss.reduction == "sum" else 1.0 / n_tokens.clamp(min=1)
            row_scale = torch.ones_like(lam) * factor  # mean: 1 / n_tokens on every row
        ce, kl, grad_h, grad_w = fused_reg_lm_forward(
            hidden, lm_weight, labels, heads, attr_weights, lam, row_scale, opts, need_h, need_w
        )
        per_token = torch.where(valid, ce + lam * kl, torch.zeros_like(ce))  # [N] fp32
        if opts.loss.reduction == "none":
            loss = per_token
        elif opts.loss.reduction == "sum":
            loss = per_token.sum()
        else:
            loss = per_token.sum() / n_tokens.clamp(min=1)
        ctx.mark_non_differentiable(ce, kl)
        ctx.opts = opts
        ctx.heads = heads
        ctx.needs = (need_h, need_w)
        if eager_grads:
            ctx.save_for_backward(grad_h, grad_w)
        else:
            ctx.save_for_backward(hidden, lm_weight, labels, attr_weights, lam)
        ctx.dtypes = (hidden.dtype, lm_weight.dtype)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_ce: torch.Tensor, _grad_kl: torch.Tensor):
        need_h, need_w = ctx.needs
        if ctx.opts.loss.reduction != "none":
            grad_h, grad_w = ctx.saved_tensors
            if grad_loss.item() != 1.0:  # the usual loss.backward() passes exactly 1
                grad_h = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
                grad_w = None if grad_w is None else grad_w * grad_loss
        else:
            hidden, lm_weight, labels, attr_weights, lam = ctx.saved_tensors
            _, _, grad_h, grad_w = fused_reg_lm_forward(
                hidden, lm_weight, labels, ctx.heads, attr_weights, lam,
                grad_loss.to(torch.float32), ctx.opts, need_h, need_w,
            )  # fmt: skip
        grad_w = None if grad_w is None else grad_w.to(ctx.dtypes[1])
        return grad_h, grad_w, None, None, None, None, None


def regularized_lm_loss(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    labels: torch.Tensor,
    heads: list[RegHead],
    attr_weights: torch.Tensor,
    lam: torch.Tensor,
    opts: LossOptions,
    config: KernelConfig | None = None,
) -> LossOutput:
    """CE + λ_t·KL(sg[q_t] ‖ p_t) per token, fused with the LM head matmul (Triton).

    Args:
        hidden: [N, H] final hidden states (fp32/bf16/fp16).
        lm_weight: [V, H] LM head weight.
        labels: [N] int64 next-token labels (``opts.ignore_index`` = ignored).
        heads: K frozen heads (no gradient).
        attr_weights: [K] fp32.
        lam: [N] fp32 per-token λ_t.
        opts: reduction, ignore_index, chunk_size.
        config: launch parameters (tests use small tiles).

    Returns:
        LossOutput(loss, ce [N], kl [N], n_tokens); gradients to ``hidden`` and ``lm_weight``.
    """
    fopts = FusedRegOptions(opts, config or KernelConfig())
    loss, ce, kl = FusedRegLMFunction.apply(
        hidden, lm_weight, labels, attr_weights, lam, list(heads), fopts
    )
    return LossOutput(loss, ce, kl, (labels != opts.ignore_index).sum())
