"""KL(q_t ‖ p_t) per row from given logits: one online two-LSE sweep forward, one gradient sweep.

Maths (row t, vocabulary V, K heads with weights w_k):

    p_t = softmax(ℓ_t)                      q_t = softmax(sg[b_t] + log R_t)
    log R_t = Σ_k w_k logσ(r_{k,t})         b_t = ℓ_t, or a reference model's logits
    KL_t = Σ_v q_t[v] (log q_t[v] − log p_t[v])
    ∂KL_t/∂ℓ_t = p_t − q_t                  (q is detached: docs/design.md, "What is detached")

Forward: ``_token_kl_fwd_kernel`` runs one program per row and reads ℓ, b and the K head-logit
rows once, tile by tile, keeping the six scalars of ``_math.two_lse_step``; it writes KL and
five per-row statistics (p's max and log-normaliser, q's anchor and log-normaliser). q is never
stored.

Backward: ``_token_kl_bwd_kernel`` reads the same rows once more and writes
``grad_out[t] · (p_t − q_t)`` in the logits' dtype.

Memory traffic per row (B bytes per element): forward (2 + K)·V·B reads (1 + K without a
reference), backward the same plus V·B writes. An eager PyTorch version materialises log p, log R,
log q, q and the product in fp32, each [N, V], so it moves roughly 10–12 fp32 [N, V] tensors
through memory; this path moves (2 + K) input-dtype tensors forward and (3 + K) backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from attrctl.kernels._math import log_r_tile, safe, safe_log, two_lse_step
from attrctl.kernels._utils import KernelConfig, pick_block_v, pick_num_warps

# per-row statistics saved for backward: max ℓ, log d_p, and q's anchor β, ρ and log d_q
N_STATS = 5


@triton.jit
def _token_kl_fwd_kernel(
    logits_ptr,  # [N, V] ℓ, any float dtype, unit stride along V
    logits_stride,
    ref_ptr,  # [N, V] b (the reference logits); ignored unless HAS_REF
    ref_stride,
    reg_ptr,  # [K, N, V] head logits r_k, unit stride along V
    reg_stride_k,
    reg_stride_n,
    w_ptr,  # [K] fp32 attribute weights
    mask_ptr,  # [N] int8 row mask (1 = compute); ignored unless HAS_MASK
    kl_ptr,  # [N] fp32 out: KL(q_t ‖ p_t), 0 on masked rows
    stats_ptr,  # [5, N] fp32 out: max ℓ, log d_p, β, ρ, log d_q (see _math)
    N,
    V,
    K,
    HAS_REF: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row · stride overflows int32 at 32k × 128k
    n_cols = V
    if HAS_MASK:
        n_cols = tl.where(tl.load(mask_ptr + row) != 0, V, 0)  # masked rows skip the sweep
    l_row = logits_ptr + row * logits_stride
    b_row = ref_ptr + row * ref_stride
    r_row = reg_ptr + row * reg_stride_n

    ninf = float("-inf")
    m_p = tl.full((), ninf, tl.float32)
    beta = tl.full((), ninf, tl.float32)  # q's anchor: none yet
    rho = tl.zeros((), tl.float32)
    d_p = tl.zeros((), tl.float32)
    d_q = tl.zeros((), tl.float32)
    e_q = tl.zeros((), tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        col_mask = offs < V
        lg = tl.load(l_row + offs, mask=col_mask, other=ninf).to(tl.float32)
        if HAS_REF:  # noqa: SIM108 (a constexpr branch: no load at all without a reference)
            b = tl.load(b_row + offs, mask=col_mask, other=ninf).to(tl.float32)
        else:
            b = lg
        log_r = log_r_tile(r_row, reg_stride_k, w_ptr, offs, col_mask, K, BLOCK_V)
        m_p, d_p, beta, rho, d_q, e_q = two_lse_step(
            lg, b, log_r, m_p, d_p, beta, rho, d_q, e_q, HAS_REF, BLOCK_V
        )

    active = n_cols > 0
    log_dp = safe_log(d_p)
    log_dq = safe_log(d_q)
    kl = e_q / tl.where(active, d_q, 1.0) - log_dq + log_dp
    if not HAS_REF:
        kl -= safe(beta) - safe(m_p)  # β − m_p: q's mode below p's, exact near the top
    tl.store(kl_ptr + row, tl.where(active, kl, 0.0))
    tl.store(stats_ptr + row, safe(m_p))
    tl.store(stats_ptr + N + row, log_dp)
    tl.store(stats_ptr + 2 * N + row, safe(beta))
    tl.store(stats_ptr + 3 * N + row, rho)
    tl.store(stats_ptr + 4 * N + row, log_dq)


@triton.jit
def _token_kl_bwd_kernel(
    logits_ptr,  # [N, V] ℓ
    logits_stride,
    ref_ptr,  # [N, V] b; ignored unless HAS_REF
    ref_stride,
    reg_ptr,  # [K, N, V] head logits
    reg_stride_k,
    reg_stride_n,
    w_ptr,  # [K] fp32
    mask_ptr,  # [N] int8; ignored unless HAS_MASK
    stats_ptr,  # [5, N] fp32 from the forward kernel
    grad_out_ptr,  # [N] fp32 upstream gradient of KL_t
    grad_ptr,  # [N, V] out: grad_out[t] · (p_t − q_t), dtype of ℓ, contiguous
    N,
    V,
    K,
    HAS_REF: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(grad_out_ptr + row)
    if HAS_MASK:
        g = tl.where(tl.load(mask_ptr + row) != 0, g, 0.0)
    m_p = tl.load(stats_ptr + row)
    log_dp = tl.load(stats_ptr + N + row)
    beta = tl.load(stats_ptr + 2 * N + row)
    rho = tl.load(stats_ptr + 3 * N + row)
    log_dq = tl.load(stats_ptr + 4 * N + row)
    l_row = logits_ptr + row * logits_stride
    b_row = ref_ptr + row * ref_stride
    r_row = reg_ptr + row * reg_stride_n
    out_row = grad_ptr + row * V
    # a zero upstream gradient (masked row) writes zeros without reading the inputs
    n_read = tl.where(g != 0.0, V, 0)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        col_mask = offs < V
        read_mask = offs < n_read
        lg = tl.load(l_row + offs, mask=read_mask, other=float("-inf")).to(tl.float32)
        if HAS_REF:
            b = tl.load(b_row + offs, mask=read_mask, other=float("-inf")).to(tl.float32)
        else:
            b = lg
        log_r = log_r_tile(r_row, reg_stride_k, w_ptr, offs, read_mask, K, BLOCK_V)
        p = tl.exp(lg - m_p - log_dp)
        q = tl.exp((b - beta) + (log_r - rho) - log_dq)  # differences first, as in _math
        grad = g * (p - q)
        tl.store(out_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=col_mask)


@dataclass(frozen=True)
class TokenKLOptions:
    """Non-tensor inputs of :class:`TokenKLFunction` (launch parameters only)."""

    kernel: KernelConfig


def _rows(x: torch.Tensor) -> torch.Tensor:
    # kernels index rows by stride and the vocabulary by unit stride
    return x if x.stride(-1) == 1 else x.contiguous()


def token_kl_forward(
    logits: torch.Tensor,
    reg_logits: torch.Tensor,
    attr_weights: torch.Tensor,
    ref_logits: torch.Tensor | None,
    mask: torch.Tensor | None,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward sweep.

    Args:
        logits: [N, V] ℓ.
        reg_logits: [K, N, V] head logits.
        attr_weights: [K] attribute weights.
        ref_logits: [N, V] or None (then q is built from sg[ℓ]).
        mask: [N] bool or None.
        config: launch parameters.

    Returns:
        ``(kl [N] fp32, stats [5, N] fp32)``; ``stats`` feeds :func:`token_kl_backward`.
    """
    n, v = logits.shape
    k = reg_logits.shape[0]
    logits, reg_logits = _rows(logits), _rows(reg_logits)
    ref = logits if ref_logits is None else _rows(ref_logits)
    w = attr_weights.to(device=logits.device, dtype=torch.float32).contiguous()
    mask_i8 = None if mask is None else mask.to(torch.int8).contiguous()
    kl = torch.empty(n, device=logits.device, dtype=torch.float32)
    stats = torch.empty(N_STATS, n, device=logits.device, dtype=torch.float32)
    if n == 0:
        return kl, stats
    block_v = pick_block_v(v, config)
    _token_kl_fwd_kernel[(n,)](
        logits, logits.stride(0), ref, ref.stride(0),
        reg_logits, reg_logits.stride(0), reg_logits.stride(1), w,
        logits if mask_i8 is None else mask_i8, kl, stats, n, v, k,
        HAS_REF=ref_logits is not None, HAS_MASK=mask is not None, BLOCK_V=block_v,
        num_warps=pick_num_warps(block_v, config),
    )  # fmt: skip
    return kl, stats


def token_kl_backward(
    grad_out: torch.Tensor,
    logits: torch.Tensor,
    reg_logits: torch.Tensor,
    attr_weights: torch.Tensor,
    ref_logits: torch.Tensor | None,
    mask: torch.Tensor | None,
    stats: torch.Tensor,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Launch the gradient sweep: returns [N, V] ``grad_out[t]·(p_t − q_t)`` in ℓ's dtype."""
    n, v = logits.shape
    k = reg_logits.shape[0]
    logits, reg_logits = _rows(logits), _rows(reg_logits)
    ref = logits if ref_logits is None else _rows(ref_logits)
    w = attr_weights.to(device=logits.device, dtype=torch.float32).contiguous()
    mask_i8 = None if mask is None else mask.to(torch.int8).contiguous()
    g = grad_out.to(torch.float32).expand(n).contiguous()
    grad = torch.empty((n, v), device=logits.device, dtype=logits.dtype)
    if n == 0:
        return grad
    block_v = pick_block_v(v, config)
    _token_kl_bwd_kernel[(n,)](
        logits, logits.stride(0), ref, ref.stride(0),
        reg_logits, reg_logits.stride(0), reg_logits.stride(1), w,
        logits if mask_i8 is None else mask_i8, stats, g, grad, n, v, k,
        HAS_REF=ref_logits is not None, HAS_MASK=mask is not None, BLOCK_V=block_v,
        num_warps=pick_num_warps(block_v, config),
    )  # fmt: skip
    return grad


class TokenKLFunction(torch.autograd.Function):
    """KL(q_t ‖ p_t) per row; the gradient goes to ``logits`` only (q is a detached target)."""

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,  # [N, V]
        reg_logits: torch.Tensor,  # [K, N, V]
        attr_weights: torch.Tensor,  # [K] fp32
        ref_logits: torch.Tensor | None,  # [N, V] or None
        mask: torch.Tensor | None,  # [N] bool or None
        opts: TokenKLOptions,
    ) -> torch.Tensor:  # [N] fp32
        kl, stats = token_kl_forward(
            logits, reg_logits, attr_weights, ref_logits, mask, opts.kernel
        )
        ctx.save_for_backward(logits, reg_logits, attr_weights, ref_logits, mask, stats)
        ctx.opts = opts
        return kl

    @staticmethod
    def backward(ctx, grad_kl: torch.Tensor):
        logits, reg_logits, attr_weights, ref_logits, mask, stats = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = token_kl_backward(
                grad_kl, logits, reg_logits, attr_weights, ref_logits, mask, stats, ctx.opts.kernel
            )
        return grad, None, None, None, None, None


def token_kl(
    logits: torch.Tensor,
    reg_logits: torch.Tensor,
    attr_weights: torch.Tensor,
    ref_logits: torch.Tensor | None,
    mask: torch.Tensor | None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """KL(q_t ‖ p_t) per row with Triton (inputs normalised by ``attrctl.losses``).

    Args:
        logits: [N, V] LM logits (fp32/bf16/fp16; accumulated in fp32).
        reg_logits: [K, N, V] head logits.
        attr_weights: [K] fp32.
        ref_logits: [N, V] or None.
        mask: [N] bool or None; False rows give 0 and a zero gradient.
        config: launch parameters (tests use small tiles).

    Returns:
        [N] fp32; its gradient w.r.t. ``logits`` is ``grad_out[t]·(p_t − q_t)``.
    """
    opts = TokenKLOptions(config or KernelConfig())
    return TokenKLFunction.apply(logits, reg_logits, attr_weights, ref_logits, mask, opts)
