"""Triton kernels of the regularized losses (the ``triton`` impl of ``attrctl.losses``).

One kernel per module, each layered ``_op_*_kernel`` → ``op_forward``/``op_backward`` launcher →
``OpFunction(torch.autograd.Function)`` → the function below:

* ``token_kl`` (``kl.py``; not ``token_kl.py``, which would shadow this function once imported) — KL(q_t ‖ p_t) per row from given logits.
* ``regularized_lm_loss`` (``fused_linear_reg.py``) — fused-linear CE + λ_t·KL from hidden
  states: torch matmuls per row chunk, one Triton sweep per row for the losses and the logits
  gradient.
* ``head_fit_loss`` (``head_fit.py``) — the NADO head loss, fused the same way.

The signatures are the internal ones of the loss contract (inputs already normalised by the
dispatcher). Importing this package does **not** import Triton: the kernel modules load on the
first call, and Triton decides at that moment whether to compile for the GPU or to run the CPU
interpreter (``TRITON_INTERPRET=1``), so set that variable before the first call.
:func:`triton_support` tells the dispatcher whether the kernels can run, and why not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from attrctl.kernels._utils import KernelConfig, triton_support

if TYPE_CHECKING:
    import torch

    from attrctl.losses.types import HeadFitOutput, LossOptions, LossOutput, RegHead


def token_kl(
    logits: torch.Tensor,
    reg_logits: torch.Tensor,
    attr_weights: torch.Tensor,
    ref_logits: torch.Tensor | None,
    mask: torch.Tensor | None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """KL(q_t ‖ p_t) per row; see :func:`attrctl.kernels.kl.token_kl`."""
    from attrctl.kernels.kl import token_kl as impl

    return impl(logits, reg_logits, attr_weights, ref_logits, mask, config)


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
    """Fused-linear CE + λ_t·KL; see :func:`attrctl.kernels.fused_linear_reg.regularized_lm_loss`."""
    from attrctl.kernels.fused_linear_reg import regularized_lm_loss as impl

    return impl(hidden, lm_weight, labels, heads, attr_weights, lam, opts, config)


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
    """The NADO head loss; see :func:`attrctl.kernels.head_fit.head_fit_loss`."""
    from attrctl.kernels.head_fit import head_fit_loss as impl

    return impl(
        hidden, lm_weight, head_states, head_weight, head_bias, tokens, labels, mask, pair_mask,
        mu, opts, config,
    )  # fmt: skip


__all__ = ["KernelConfig", "head_fit_loss", "regularized_lm_loss", "token_kl", "triton_support"]
