"""Triton device functions shared by the kernels: stable logσ and the online two-LSE step.

The two-LSE step is the core of every kernel here. For one row it streams tiles of

    ℓ        the LM logits (p = softmax ℓ),
    b        the base of the projection (b = sg[ℓ], or a reference model's logits),
    log R    = Σ_k w_k logσ(r_k)            (q = softmax(b + log R)),

and keeps six fp32 scalars: for p the running max and sum, for q an *anchor* — the base value
``β`` and log R value ``ρ`` of the running mode of q (the argmax of b + log R) — and two sums:

    m_p = max ℓ              d_p = Σ exp(ℓ − m_p)
    β, ρ                     s   = (b − β) + (log R − ρ)          (≤ 0 up to rounding)
                             d_q = Σ exp(s)
                             e_q = Σ exp(s) · (log R − ρ)                  (b = ℓ)
                             e_q = Σ exp(s) · (s − (ℓ − m_p))              (reference b)

from which

    LSE(ℓ)          = m_p + log d_p
    LSE(b + log R)  = β + ρ + log d_q
    KL(q ‖ p)       = e_q / d_q − (β − m_p) − log d_q + log d_p           (b = ℓ)
    KL(q ‖ p)       = e_q / d_q − log d_q + log d_p                       (reference b)

What this does and does not cancel. Every quantity is a *difference* taken before it is summed:
``ℓ − m_p`` and ``b − β`` are exact near the mode whatever the magnitude of the logits, and
``log R − ρ`` is exact wherever log R is close to its value at the mode. So with |ℓ| ~ 1e4 the
terms stay O(1) (a plain ``LSE(ℓ + log R) − LSE(ℓ)`` in fp32 loses the ulp of 1e4, 1e-3), and a
log R of −100 (two heads at r = −50) no longer enters as −100: the earlier form
``E_q[log R] − c − log d_q + log d_p`` subtracted two terms of that size and returned −6e-5
where the KL is 0. What remains is the fp32 rounding of the pieces: the KL's error is a few ulps
of ``|E_q[log R − ρ]| + |β − m_p| + |log d_q| + |log d_p|``, which are of the size of the
*variation* of log R and ℓ over the mass of q and p, not of their magnitude. A log R that is
constant on the row gives ``e_q = 0`` and ``d_q = d_p`` (the same sums, term for term, when the
mode of q is the mode of p), hence KL = 0 exactly; log R itself is summed over the heads in fp32,
so at log R ≈ −100 it carries its own rounding of ~4e-6 per entry, which moves the KL by that
times the spread of log R over q (≲ 1e-6 for a spread below 1; see tests/test_losses.py).

Updates. When m_p grows by δ the previous sums rescale by exp(−δ); when the anchor moves (a
tile holds a larger b + log R) the previous q sums rescale by exp of the (non-positive) anchor
shift, and e_q gains shift·d_q (plus δ·d_q for a reference base, whose e_q holds ℓ − m_p).
Entries with ℓ = −inf (a masked vocabulary) contribute exactly 0 to every sum; the ``safe``
maxima keep −inf − (−inf) out.
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
def log_sigmoid(r):
    # logσ(r) = min(r, 0) − log1p(exp(−|r|)): never exp of a positive number, and for r ≪ 0 it
    # returns r itself instead of log(σ(r)) = log(0) = −inf.
    return tl.minimum(r, 0.0) - _log1p(tl.exp(-tl.abs(r)))


@triton.jit
def safe(m):
    # a running max that is still −inf (nothing seen yet) acts as 0 when subtracted
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def log_r_tile(
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
        log_r += w * log_sigmoid(r.to(tl.float32))
    return log_r


@triton.jit
def _pick(sel, x):
    # x at the one lane where sel is True (a scalar); 0 when no lane is selected
    return tl.sum(tl.where(sel, x, 0.0), 0)


@triton.jit
def two_lse_step(
    lg, b, log_r, m_p, d_p, beta, rho, d_q, e_q, HAS_REF: tl.constexpr, BLOCK_V: tl.constexpr
):
    """One tile of the online two-LSE pass (see the module docstring); returns the new state.

    ``beta = −inf`` means "no anchor yet"; ``lg``, ``b``, ``log_r`` are [BLOCK_V] fp32 with −inf
    in ``lg``/``b`` on padding lanes.
    """
    ninf = float("-inf")
    lanes = tl.arange(0, BLOCK_V)
    # p: online max and sum of exp(ℓ − m_p)
    m_p_new = tl.maximum(m_p, tl.max(lg, 0))
    delta_p = tl.where(m_p == ninf, 0.0, m_p_new - m_p)
    x = lg - safe(m_p_new)  # ℓ − m_p: exact near the max, whatever the magnitude of ℓ
    d_p = d_p * tl.exp(-delta_p) + tl.sum(tl.exp(x), 0)

    # q's anchor. On the first live tile: the lane of the largest b, so that with a constant
    # log R it stays the anchor and q's sums repeat p's term for term (KL exactly 0). The
    # branches are uniform per program and rarely taken after the first tiles.
    if beta == ninf:
        j0 = lanes == tl.argmax(b, 0)
        beta = _pick(j0, b)  # stays −inf while every lane so far is −inf
        rho = _pick(j0, log_r)
    s = (b - safe(beta)) + (log_r - rho)  # log-weights relative to the anchor
    shift = tl.zeros((), tl.float32)  # ≤ 0: how the old sums rescale when the anchor moves
    rho_shift = tl.zeros((), tl.float32)
    if tl.max(s, 0) > 0.0:  # this tile holds a larger b + log R: move the anchor there
        j1 = lanes == tl.argmax(s, 0)
        beta_new = _pick(j1, b)
        rho_new = _pick(j1, log_r)
        # beta is finite here (some lane beat it); with no old sums yet (d_q = 0) shift is moot
        shift = (beta - beta_new) + (rho - rho_new)
        rho_shift = rho - rho_new
        beta = beta_new
        rho = rho_new
        s = (b - beta) + (log_r - rho)
    alpha = tl.exp(shift)
    eu = tl.exp(s)  # 0 on lanes with b = −inf (q = 0 there)
    if HAS_REF:
        # lanes with q = 0 get diff 0, not −inf − (−inf); ℓ = −inf under q > 0 is +inf
        dead = s == ninf
        diff = tl.where(dead, 0.0, s) - tl.where(dead, 0.0, x)
        e_q = (e_q + (shift + delta_p) * d_q) * alpha
    else:
        diff = log_r - rho
        e_q = (e_q + rho_shift * d_q) * alpha
    e_q += tl.sum(tl.where(s == ninf, 0.0, eu * diff), 0)
    d_q = d_q * alpha + tl.sum(eu, 0)
    return m_p_new, d_p, beta, rho, d_q, e_q


@triton.jit
def safe_log(d):
    # log of a sum that is 0 on skipped rows; those rows' outputs are masked afterwards
    return tl.log(tl.where(d > 0.0, d, 1.0))


__all__ = [
    "_log1p",
    "_pick",
    "log_r_tile",
    "log_sigmoid",
    "safe",
    "safe_log",
    "triton",
    "two_lse_step",
]
