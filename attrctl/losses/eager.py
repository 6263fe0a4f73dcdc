"""The reference losses (fp32, full logits), from the definitions in docs/design.md, "The method".

This is the ground truth the fast paths (``chunked``, ``triton``) are tested and benchmarked
against, so it deliberately shares no code with them: it materialises the whole ``[N, V]``
logits, uses ``torch.log_softmax``/``logsumexp`` as written in the maths, and lets autograd
derive every gradient. Memory: about six fp32 ``[N, V]`` tensors live at once (logits, log p,
log q, q, their products and the gradient), which is what ``chunked`` exists to avoid.

Inputs arrive normalised by the dispatcher (``attrctl.losses``): reg logits as ``[K, N, V]``,
``attr_weights`` as fp32 ``[K]``, ``lam`` as fp32 ``[N]``, masks as bool ``[N]``.

Maths (per row t, p = softmax(ℓ), w_k = attribute weights):
    log R_t   = Σ_k w_k · logσ(r_{k,t})
    q_t       = softmax(sg[ℓ_t or ℓ_ref,t] + log R_t)
    KL_t      = Σ_v q_t[v] (log q_t[v] − log p_t[v])          (forward KL, q detached)
    loss_t    = CE(ℓ_t, y_t) + λ_t · KL_t                      (regularized_lm_loss)
Head fitting (head_fit_loss), a_t = r_t[x_{t+1}] (the head's logit for the token taken at row t)
and m_t = log E_{p_t}[σ(r_t)] = LSE(ℓ_t + logσ r_t) − LSE(ℓ_t):
    loss_t    = mask_t · BCE(a_t, y_t) + μ · pair_t · (logσ(a_{t−1}) − m_t)²
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attrctl.losses.types import HeadFitOutput, LossOptions, LossOutput, RegHead


def _reduce(per_token: torch.Tensor, n_tokens: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    # mean over counted tokens; clamp so an all-ignored batch gives 0 (and zero grads), not NaN
    return total / n_tokens.clamp(min=1).to(total.dtype)


def _kl_rows(
    logits: torch.Tensor,  # [N, V] fp32, carries grad
    reg_logits: torch.Tensor,  # [K, N, V] fp32
    attr_weights: torch.Tensor,  # [K] fp32
    ref_logits: torch.Tensor | None,  # [N, V] fp32 or None
) -> torch.Tensor:  # [N]
    log_p = torch.log_softmax(logits, dim=-1)
    log_r = (attr_weights.view(-1, 1, 1) * F.logsigmoid(reg_logits)).sum(0)  # [N, V]
    base = logits.detach() if ref_logits is None else ref_logits.detach()
    # q = softmax(base + log R) is unchanged by subtracting a constant per row from base or from
    # log R. Measured from their values at q's mode j, both terms keep the precision of their
    # differences: with |ℓ| ~ 1e4 or log R ~ −100 (two heads at r = −50) a plain fp32
    # base + log R rounds to the ulp of 1e4 (1e-3) or 100 (8e-6) and q moves by as much; shifted,
    # a constant log R leaves base unchanged, so q = p and KL = 0 exactly.
    j = (base + log_r).argmax(-1, keepdim=True)  # [N, 1] q's mode (rounding here is harmless)
    shifted = (base - base.gather(-1, j)) + (log_r - log_r.gather(-1, j))
    log_q = torch.log_softmax(shifted, dim=-1).detach()
    q = log_q.exp()
    # entries with q = 0 (e.g. masked vocabulary, ℓ = -inf) contribute 0, not 0·(−inf − −inf)
    terms = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q))
    return terms.sum(-1)


def token_kl(
    logits: torch.Tensor,
    reg_logits: torch.Tensor,
    attr_weights: torch.Tensor,
    ref_logits: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """KL(q_t ‖ p_t) per row, q built from detached logits (or ``ref_logits``).

    Args:
        logits: [N, V] LM logits (any float dtype; computed in fp32).
        reg_logits: [K, N, V] head logits.
        attr_weights: [K] fp32 attribute weights.
        ref_logits: [N, V] or None.
        mask: [N] bool or None; False rows give 0 and no gradient.

    Returns:
        [N] fp32 KL per row; its gradient w.r.t. ``logits`` is ``grad_out[t]·(p_t − q_t)``.
    """
    x = logits.float()
    r = reg_logits.float()
    ref = None if ref_logits is None else ref_logits.float()
    if mask is not None:
        # neutralise masked rows *before* the maths so garbage there (e.g. all -inf) cannot NaN
        keep = mask.view(-1, 1)
        x = torch.where(keep, x, torch.zeros_like(x))
        r = torch.where(keep.unsqueeze(0), r, torch.zeros_like(r))
        if ref is not None:
            ref = torch.where(keep, ref, torch.zeros_like(ref))
    kl = _kl_rows(x, r, attr_weights.float(), ref)
    if mask is not None:
        kl = torch.where(mask, kl, torch.zeros_like(kl))
    return kl


def regularized_lm_loss(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    labels: torch.Tensor,
    heads: list[RegHead],
    attr_weights: torch.Tensor,
    lam: torch.Tensor,
    opts: LossOptions,
) -> LossOutput:
    """CE + λ_t·KL(sg[q_t] ‖ p_t) per token, from full fp32 logits.

    Args:
        hidden: [N, H] final hidden states.
        lm_weight: [V, H] LM head weight.
        labels: [N] int64 next-token labels (``opts.ignore_index`` = ignored).
        heads: K frozen heads (no gradient).
        attr_weights: [K] fp32.
        lam: [N] fp32 per-token λ_t.
        opts: reduction, ignore_index.

    Returns:
        LossOutput with gradients to ``hidden`` and ``lm_weight``.
    """
    logits = hidden.float() @ lm_weight.float().T  # [N, V]
    reg = [
        h.states.float() @ h.weight.float().T + (0.0 if h.bias is None else h.bias.float())
        for h in heads
    ]
    # K = 0 heads: an empty [0, N, V] stack gives log R = 0, q = p, KL = 0 (plain CE)
    reg = torch.stack(reg).detach() if reg else logits.new_zeros((0, *logits.shape))  # [K, N, V]
    valid = labels != opts.ignore_index  # [N]
    ce = F.cross_entropy(logits, labels, ignore_index=opts.ignore_index, reduction="none")
    kl = token_kl(logits, reg, attr_weights, None, valid)
    per_token = torch.where(valid, ce + lam.float() * kl, torch.zeros_like(ce))
    n_tokens = valid.sum()
    loss = _reduce(per_token, n_tokens, opts.reduction)
    zero = torch.zeros_like(ce)
    return LossOutput(
        loss,
        torch.where(valid, ce, zero).detach(),
        torch.where(valid, kl, zero).detach(),
        n_tokens,
    )


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
    """The NADO head loss: BCE on the taken token + μ · log-space consistency.

    Args:
        hidden: [N, H] frozen LM hidden states (no gradient).
        lm_weight: [V, H] frozen LM head weight (no gradient).
        head_states: [N, Hk] the head's input.
        head_weight: [V, Hk] the head's projection.
        head_bias: [V] or None.
        tokens: [N] int64, the token taken at row t (x_{t+1}); in range wherever ``mask``.
        labels: [N] fp32 in [0, 1], the oracle's label of the row's sequence.
        mask: [N] bool, rows whose BCE counts (and the "mean" denominator).
        pair_mask: [N] bool, rows t whose consistency with row t−1 counts (False at t=0 and at
            sequence starts).
        mu: weight of the consistency term.
        opts: reduction (``ignore_index`` and ``chunk_size`` are unused here).

    Returns:
        HeadFitOutput with gradients to ``head_states``, ``head_weight`` and ``head_bias``.
    """
    with torch.no_grad():
        logits = hidden.float() @ lm_weight.float().T  # [N, V], frozen LM
    r = head_states.float() @ head_weight.float().T  # [N, V]
    if head_bias is not None:
        r = r + head_bias.float()
    safe_tok = torch.where(mask, tokens, torch.zeros_like(tokens))
    a = r.gather(1, safe_tok.view(-1, 1)).squeeze(1)  # [N] head logit of the taken token
    bce = F.binary_cross_entropy_with_logits(a, labels.float(), reduction="none")
    m = torch.logsumexp(logits + F.logsigmoid(r), dim=-1) - torch.logsumexp(logits, dim=-1)
    prev = torch.cat([a.new_zeros(1), F.logsigmoid(a[:-1])])  # logσ(a_{t−1}); unused at t=0
    cons = (prev - m) ** 2
    zero = torch.zeros_like(bce)
    bce = torch.where(mask, bce, zero)
    cons = torch.where(pair_mask, cons, zero)
    per_row = bce + mu * cons
    n_tokens = mask.sum()
    return HeadFitOutput(
        _reduce(per_row, n_tokens, opts.reduction), bce.detach(), cons.detach(), n_tokens
    )
