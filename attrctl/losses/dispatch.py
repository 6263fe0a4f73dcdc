"""Input validation, normalisation and the ``impl`` choice for the public loss functions.

Every implementation module (``eager``, ``chunked``, ``attrctl.kernels``) exposes
``token_kl``, ``regularized_lm_loss`` and ``head_fit_loss`` with the same normalised signatures;
this module turns user input into those (reg logits ``[K, N, V]``, fp32 ``[K]`` attribute
weights, fp32 ``[N]`` λ, bool ``[N]`` masks), raises ``ValueError``/``TypeError`` with actionable
messages, and resolves ``impl`` once per call at call time (never at import).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Sequence
from types import ModuleType

import torch

from attrctl.errors import AttrctlError
from attrctl.losses.types import IMPLS, REDUCTIONS, HeadFitOutput, LossOptions, LossOutput, RegHead

log = logging.getLogger("attrctl.losses")
_LOGGED: set[tuple[str, str]] = set()


# --------------------------------------------------------------------------- impl resolution


def _triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton path cannot run here, or None when it can (the kernels package decides;
    importing it does not import Triton)."""
    from attrctl.kernels import triton_support

    ok, reason = triton_support(device)
    return None if ok else reason


def resolve_impl(impl: str, device: torch.device, op: str = "regularized_lm_loss") -> str:
    """Turn ``impl`` into a concrete implementation name for tensors on ``device``.

    ``"auto"`` picks ``"triton"`` when the tensors are on CUDA, Triton imports and the kernels
    provide ``op``; otherwise ``"chunked"``. The choice is logged once per (op, choice).

    Raises:
        ValueError: unknown ``impl``.
        AttrctlError: ``impl="triton"`` was requested but cannot run; the message says why.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    if impl == "auto":
        choice = "chunked"
        why = f"tensors on {device.type}"
        if device.type == "cuda":
            reason = _triton_unavailable_reason(device)
            if reason is None:
                try:
                    _kernel_fn(op)
                    choice, why = "triton", "CUDA and Triton available"
                except AttrctlError as err:
                    why = str(err)
            else:
                why = reason
        if (op, choice) not in _LOGGED:
            _LOGGED.add((op, choice))
            log.info("attrctl.losses.%s: impl=auto -> %s (%s)", op, choice, why)
        return choice
    if impl == "triton":
        reason = _triton_unavailable_reason(device)
        if reason is not None:
            raise AttrctlError(f"impl='triton' cannot run: {reason}")
    return impl


def _kernel_fn(op: str):
    try:
        kernels: ModuleType = importlib.import_module("attrctl.kernels")
    except ImportError as err:  # pragma: no cover - depends on the install
        raise AttrctlError(
            f"impl='triton' cannot run: attrctl.kernels failed to import ({err})"
        ) from err
    fn = getattr(kernels, op, None)
    if fn is None:
        raise AttrctlError(f"impl='triton' cannot run: attrctl.kernels does not provide {op}()")
    return fn


def _impl_fn(impl: str, op: str):
    if impl == "eager":
        from attrctl.losses import eager

        return getattr(eager, op)
    if impl == "chunked":
        from attrctl.losses import chunked

        return getattr(chunked, op)
    return _kernel_fn(op)


# --------------------------------------------------------------------------- validation helpers


def _check_tensor(name: str, t: object, ndim: int, *, floating: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions; got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got {t.dtype}")
    return t


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")


def _check_chunk(chunk_size: int | None) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")


def _mask(name: str, mask: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor) or mask.shape != (n,):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool tensor of shape [{n}]; got {shape}")
    return mask.to(device=device, dtype=torch.bool)


def _attr_weights(
    attr_weights: Sequence[float] | torch.Tensor | None, k: int, device: torch.device
) -> torch.Tensor:
    if attr_weights is None:
        return torch.ones(k, dtype=torch.float32, device=device)
    w = torch.as_tensor(attr_weights, dtype=torch.float32, device=device).reshape(-1)
    if w.numel() != k:
        raise ValueError(f"attr_weights must have one weight per attribute ({k}); got {w.numel()}")
    return w


def _same_device(device: torch.device, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")


# --------------------------------------------------------------------------- public functions


def token_kl(
    logits: torch.Tensor,
    reg_logits: torch.Tensor,
    *,
    attr_weights: Sequence[float] | torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """KL(q_t ‖ p_t) per row, the I-projection regularizer (docs/design.md, "The method").

    ``q_t = softmax(sg[ref_t] + Σ_k w_k logσ(r_{k,t}))`` with ``ref = logits`` (detached) unless
    ``ref_logits`` is given, and ``p_t = softmax(logits_t)``.

    Args:
        logits: [N, V] LM logits (may hold ``-inf`` for masked vocabulary entries).
        reg_logits: [K, N, V] or [N, V] (K = 1) regularizer-head logits.
        attr_weights: K attribute weights w_k (default all 1).
        ref_logits: [N, V] logits of a frozen reference model, or None.
        mask: [N] bool; False rows give KL 0 and zero gradient.
        impl: ``"auto"``, ``"eager"``, ``"chunked"`` or ``"triton"``.

    Returns:
        [N] fp32. Gradient flows to ``logits`` only: ``grad_out[t] · (p_t − q_t)``.
    """
    _check_tensor("logits", logits, 2)
    n, v = logits.shape
    if not isinstance(reg_logits, torch.Tensor):
        raise TypeError(f"reg_logits must be a torch.Tensor; got {type(reg_logits).__name__}")
    reg = reg_logits.unsqueeze(0) if reg_logits.dim() == 2 else reg_logits
    if reg.dim() != 3 or reg.shape[1:] != (n, v):
        raise ValueError(
            f"reg_logits must be [K, {n}, {v}] or [{n}, {v}]; got {tuple(reg_logits.shape)}"
        )
    if ref_logits is not None and tuple(ref_logits.shape) != (n, v):
        raise ValueError(f"ref_logits must be [{n}, {v}]; got {tuple(ref_logits.shape)}")
    _same_device(logits.device, reg_logits=reg, ref_logits=ref_logits)
    w = _attr_weights(attr_weights, reg.shape[0], logits.device)
    m = None if mask is None else _mask("mask", mask, n, logits.device)
    chosen = resolve_impl(impl, logits.device, "token_kl")
    return _impl_fn(chosen, "token_kl")(logits, reg, w, ref_logits, m)


def regularized_lm_loss(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    labels: torch.Tensor,
    heads: Sequence[RegHead],
    *,
    lam: float | torch.Tensor,
    attr_weights: Sequence[float] | torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    impl: str = "auto",
    chunk_size: int | None = None,
) -> LossOutput:
    """Fused-linear ``CE(ℓ_t, y_t) + λ_t · KL(sg[q_t] ‖ p_t)`` with ``ℓ_t = hidden_t @ lm_weight.T``.

    ``q_t = softmax(sg[ℓ_t] + Σ_k w_k logσ(r_{k,t}))``, ``r_{k,t} = states_{k,t} @ weight_k.T +
    bias_k``. The ``chunked`` and ``triton`` paths never hold the whole batch's ``[N, V]``
    logits; they compute the gradient during the forward pass, so backward only scales it.

    Args:
        hidden: [N, H] final hidden states (gets a gradient).
        lm_weight: [V, H] LM head weight (gets a gradient).
        labels: [N] int64 next-token labels, already shifted; ``ignore_index`` = ignored.
        heads: K ≥ 0 frozen :class:`RegHead` (states [N, Hk], weight [V, Hk], bias [V] | None).
            With K = 0 the loss is plain CE.
        lam: λ, a float or an [N] tensor (per-token λ_t, e.g. from the example's domain).
        attr_weights: K attribute weights (default all 1).
        ignore_index: label value of ignored tokens (contribute nothing).
        reduction: ``"mean"`` over non-ignored tokens (0, with zero gradients, when all are
            ignored), ``"sum"``, or ``"none"`` ([N]).
        impl: ``"auto"``, ``"eager"``, ``"chunked"`` or ``"triton"``.
        chunk_size: rows per chunk for the fused paths; None picks one from a memory budget.

    Returns:
        :class:`LossOutput` ``(loss, ce [N], kl [N], n_tokens)``; ce/kl are detached fp32.

    Example:
        >>> out = regularized_lm_loss(h, model.lm_head.weight, labels,
        ...                           [RegHead(h.detach(), head.weight)], lam=0.5)
        >>> out.loss.backward()
    """
    _check_tensor("hidden", hidden, 2)
    _check_tensor("lm_weight", lm_weight, 2)
    n, h = hidden.shape
    v = lm_weight.shape[0]
    if lm_weight.shape[1] != h:
        raise ValueError(
            f"lm_weight must be [V, {h}] to match hidden; got {tuple(lm_weight.shape)}"
        )
    _check_tensor("labels", labels, 1, floating=False)
    if labels.shape[0] != n or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 [{n}]; got {labels.dtype} {tuple(labels.shape)}")
    _check_reduction(reduction)
    _check_chunk(chunk_size)
    dev = hidden.device
    _same_device(dev, lm_weight=lm_weight, labels=labels)
    labels = labels.long()
    valid = labels != ignore_index
    if bool(((labels < 0) | (labels >= v)).logical_and(valid).any()):
        bad = labels[valid & ((labels < 0) | (labels >= v))][0].item()
        raise ValueError(
            f"labels must be in [0, {v}) or equal ignore_index={ignore_index}; found {bad}"
        )
    norm_heads: list[RegHead] = []
    for i, head in enumerate(heads):
        states, weight, bias = RegHead(*head)
        _check_tensor(f"heads[{i}].states", states, 2)
        _check_tensor(f"heads[{i}].weight", weight, 2)
        if states.shape[0] != n or weight.shape != (v, states.shape[1]):
            raise ValueError(
                f"heads[{i}]: states must be [{n}, Hk] and weight [{v}, Hk]; got "
                f"{tuple(states.shape)} and {tuple(weight.shape)}"
            )
        if bias is not None and tuple(bias.shape) != (v,):
            raise ValueError(f"heads[{i}].bias must be [{v}]; got {tuple(bias.shape)}")
        _same_device(dev, states=states, weight=weight, bias=bias)
        # heads are frozen here: detaching makes "no gradient to heads" hold for every impl
        norm_heads.append(
            RegHead(states.detach(), weight.detach(), None if bias is None else bias.detach())
        )
    w = _attr_weights(attr_weights, len(norm_heads), dev)
    if isinstance(lam, torch.Tensor):
        lam_t = lam.detach().to(device=dev, dtype=torch.float32)
        if lam_t.dim() == 0:
            lam_t = lam_t.expand(n)
        if lam_t.shape != (n,):
            raise ValueError(f"lam must be a float or a [{n}] tensor; got {tuple(lam.shape)}")
        lam_t = lam_t.contiguous()
    elif isinstance(lam, (int, float)):
        lam_t = torch.full((n,), float(lam), dtype=torch.float32, device=dev)
    else:
        raise TypeError(f"lam must be a float or a tensor; got {type(lam).__name__}")
    opts = LossOptions(ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size)
    chosen = resolve_impl(impl, dev, "regularized_lm_loss")
    fn = _impl_fn(chosen, "regularized_lm_loss")
    return fn(hidden, lm_weight, labels, norm_heads, w, lam_t, opts)


def head_fit_loss(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    head_states: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    tokens: torch.Tensor,
    labels: torch.Tensor | float,
    *,
    mu: float,
    mask: torch.Tensor | None = None,
    pair_mask: torch.Tensor | None = None,
    reduction: str = "mean",
    impl: str = "auto",
    chunk_size: int | None = None,
) -> HeadFitOutput:
    """The NADO head loss (docs/design.md, "Fitting the heads"), fused-linear, grads to the head.

    Row t is a position of a sampled sequence, ``tokens[t] = x_{t+1}`` the token taken there and
    ``labels[t] = y`` the oracle's (soft) label of that sequence. With the head's logits
    ``r_t = head_states_t @ head_weight.T + head_bias``, the frozen LM's ``ℓ_t =
    hidden_t @ lm_weight.T``, ``a_t = r_t[x_{t+1}]`` and
    ``m_t = log E_{p_t}[σ(r_t)] = LSE(ℓ_t + logσ r_t) − LSE(ℓ_t)``::

        loss_t = mask_t · BCE(a_t, y_t) + μ · pair_t · (logσ(a_{t−1}) − m_t)²

    The consistency is compared in log space (the space the projection uses R in: log q =
    ℓ + log R), with ``logσ`` so that head logits of −50 stay finite. Gradients go through both
    sides of the consistency (both are head outputs).

    Args:
        hidden: [N, H] frozen LM hidden states (no gradient).
        lm_weight: [V, H] frozen LM head weight (no gradient).
        head_states: [N, Hk] the head's input (gets a gradient).
        head_weight: [V, Hk] (gets a gradient).
        head_bias: [V] or None (gets a gradient).
        tokens: [N] int64 token taken at each row; any value on rows outside ``mask``.
        labels: [N] float in [0, 1] (or a float for all rows).
        mu: consistency weight μ ≥ 0.
        mask: [N] bool rows that count (default all); the "mean" denominator.
        pair_mask: [N] bool rows t whose pair (t−1, t) counts. Default: ``mask[t] & mask[t−1]``,
            so a masked row (prompt, padding) between flattened sequences separates them. Always
            intersected with that default.
        reduction: ``"mean"`` (over mask rows), ``"sum"`` or ``"none"``.
        impl: ``"auto"``, ``"eager"``, ``"chunked"`` or ``"triton"``.
        chunk_size: rows per chunk for the fused paths.

    Returns:
        :class:`HeadFitOutput` ``(loss, bce [N], consistency [N], n_tokens)``.
    """
    for name, t in (("hidden", hidden), ("lm_weight", lm_weight)):
        _check_tensor(name, t, 2)
    _check_tensor("head_states", head_states, 2)
    _check_tensor("head_weight", head_weight, 2)
    n, h = hidden.shape
    v = lm_weight.shape[0]
    if lm_weight.shape[1] != h:
        raise ValueError(
            f"lm_weight must be [V, {h}] to match hidden; got {tuple(lm_weight.shape)}"
        )
    if head_states.shape[0] != n or head_weight.shape != (v, head_states.shape[1]):
        raise ValueError(
            f"head_states must be [{n}, Hk] and head_weight [{v}, Hk]; got "
            f"{tuple(head_states.shape)} and {tuple(head_weight.shape)}"
        )
    if head_bias is not None and tuple(head_bias.shape) != (v,):
        raise ValueError(f"head_bias must be [{v}]; got {tuple(head_bias.shape)}")
    _check_tensor("tokens", tokens, 1, floating=False)
    if tokens.shape[0] != n:
        raise ValueError(f"tokens must be [{n}]; got {tuple(tokens.shape)}")
    if mu < 0:
        raise ValueError(f"mu must be >= 0; got {mu}")
    _check_reduction(reduction)
    _check_chunk(chunk_size)
    dev = hidden.device
    _same_device(dev, lm_weight=lm_weight, head_states=head_states, head_weight=head_weight)
    _same_device(dev, head_bias=head_bias, tokens=tokens)
    m = _mask("mask", mask, n, dev)
    tok = torch.where(m, tokens.long(), torch.zeros_like(tokens, dtype=torch.long))
    if bool(((tok < 0) | (tok >= v)).any()):
        raise ValueError(f"tokens must be in [0, {v}) on every row in mask")
    y = torch.as_tensor(labels, dtype=torch.float32, device=dev)
    y = y.expand(n).contiguous() if y.dim() == 0 else y
    if y.shape != (n,):
        raise ValueError(f"labels must be a float or a [{n}] tensor; got {tuple(y.shape)}")
    pair = torch.zeros_like(m)
    pair[1:] = m[1:] & m[:-1]
    if pair_mask is not None:
        pair &= _mask("pair_mask", pair_mask, n, dev)
    opts = LossOptions(reduction=reduction, chunk_size=chunk_size)
    chosen = resolve_impl(impl, dev, "head_fit_loss")
    fn = _impl_fn(chosen, "head_fit_loss")
    return fn(
        hidden.detach(),
        lm_weight.detach(),
        head_states,
        head_weight,
        head_bias,
        tok,
        y,
        m,
        pair,
        float(mu),
        opts,
    )
