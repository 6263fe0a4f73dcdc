"""Triton device functions shared by the kernels: stable logσ and the online two-LSE step.

The two-LSE step is the core of every kernel here. For one row it streams tiles of

    ℓ        the LM logits (p = softmax ℓ),
    b        the base of the projection (b = sg[ℓ], or a reference model's logits),
    log R    = Σ_k w_k logσ(r_k)            (q = softmax(b + log R)),

and keeps six fp32 scalars:

    m_p = max ℓ              d_p = Σ exp(ℓ − m_p)
    m_b = max b              d_q = Σ exp(u − c),   u = b − m_b + log R,  c = max u
                             e_q = Σ exp(u − c) · (u − (ℓ − m_p))

from which, with no cancellation between large numbers,

    LSE(ℓ)          = m_p + log d_p
    LSE(b + log R)  = m_b + c + log d_q
    KL(q ‖ p)       = e_q / d_q − c − log d_q + log d_p.

Why the shifted form: with logits of magnitude 1e4 an fp32 ``LSE(ℓ + log R) − LSE(ℓ)`` loses
~1e-3 absolutely (the ulp of 1e4), while ``c + log d_q − log d_p`` involves only O(1) numbers.
When a max grows by δ, the previous sums rescale by exp(−δ) and the shifted differences in
``e_q`` move by (δ_p − δ_b), which the update adds back. Entries with ℓ = −inf (a masked
vocabulary) contribute exactly 0 to every sum; the ``_safe`` maxima keep −inf − (−inf) out.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _log1p(x):
    # log1p without libdevice (the CPU interpreter has none): Goldberg's trick, a few ulps.
    u = 1.0 + x
    den = tl.where(u == 1.0, 1.0, u - 1.0)
    return tl.where(u == 1.0, x, tl.log(u) * (x / den))


@triton.jit
def _log_sigmoid(r):
    # logσ(r) = min(r, 0) − log1p(exp(−|r|)): never exp of a positive number, and for r ≪ 0 it
    # returns r itself instead of log(σ(r)) = log(0) = −inf.
    return tl.minimum(r, 0.0) - _log1p(tl.exp(-tl.abs(r)))


@triton.jit
def _safe(m):
    # a running max that is still −inf (nothing seen yet) acts as 0 when subtracted
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _log_r_tile(
    reg_row_ptr,  # [K, ·, V] head logits, already offset to this row; stride reg_stride_k over K
    reg_stride_k,
    w_ptr,  # [K] fp32 attribute weights
    offs,  # [BLOCK_V] vocabulary indices of the tile
    col_mask,  # [BLOCK_V] offs < V
    K,
    BLOCK_V: tl.constexpr,
):
    # log R = Σ_k w_k logσ(r_k) on one tile (0 on padding lanes)
    log_r = tl.zeros((BLOCK_V,), tl.float32)
    for k in range(K):
        w = tl.load(w_ptr + k)
        r = tl.load(reg_row_ptr + k * reg_stride_k + offs, mask=col_mask, other=0.0)
        log_r += w * _log_sigmoid(r.to(tl.float32))
    return log_r


@triton.jit
def _two_lse_step(lg, b, log_r, m_p, d_p, m_b, c, d_q, e_q, HAS_REF: tl.constexpr):
    """One tile of the online two-LSE pass (see the module docstring); returns the new state."""
    ninf = float("-inf")
    m_p_new = tl.maximum(m_p, tl.max(lg, 0))
    delta_p = tl.where(m_p == ninf, 0.0, m_p_new - m_p)
    x = lg - _safe(m_p_new)  # ℓ − m_p: exact near the max, whatever the magnitude of ℓ
    d_p = d_p * tl.exp(-delta_p) + tl.sum(tl.exp(x), 0)
    if HAS_REF:
        m_b_new = tl.maximum(m_b, tl.max(b, 0))
        delta_b = tl.where(m_b == ninf, 0.0, m_b_new - m_b)
        u = (b - _safe(m_b_new)) + log_r
        # lanes with q = 0 (u = −inf) get diff 0, not −inf − (−inf); ℓ = −inf under q > 0 is +inf
        dead = u == ninf
        diff = tl.where(dead, 0.0, u) - tl.where(dead, 0.0, x)
    else:
        m_b_new = m_p_new
        delta_b = delta_p
        u = x + log_r
        diff = log_r  # (ℓ − m_p + log R) − (ℓ − m_p), exactly
    c_sh = c - delta_b
    c_new = tl.maximum(c_sh, tl.max(u, 0))
    alpha = tl.exp(c_sh - _safe(c_new))
    eu = tl.exp(u - _safe(c_new))
    if HAS_REF:  # noqa: SIM108 (constexpr branch)
        # previously accumulated differences were relative to the old maxima
        e_q = (e_q + (delta_p - delta_b) * d_q) * alpha
    else:
        e_q = e_q * alpha
    e_q += tl.sum(tl.where(u == ninf, 0.0, eu * diff), 0)
    d_q = d_q * alpha + tl.sum(eu, 0)
    return m_p_new, d_p, m_b_new, c_new, d_q, e_q


@triton.jit
def _safe_log(d):
    # log of a sum that is 0 on skipped rows; those rows' outputs are masked afterwards
    return tl.log(tl.where(d > 0.0, d, 1.0))


__all__ = ["_log1p", "_log_r_tile", "_log_sigmoid", "_safe", "_safe_log", "_two_lse_step", "triton"]
