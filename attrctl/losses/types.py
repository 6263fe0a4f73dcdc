"""Types shared by every loss implementation (``eager``, ``chunked``, ``triton``).

They live in their own module so the Triton kernels (``attrctl.kernels``) can import them without
importing the dispatcher, and so the autograd functions of every implementation take tensors plus
one frozen options object (narrow signatures: backward returns one value per input).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

Reduction = Literal["mean", "sum", "none"]
Impl = Literal["auto", "eager", "chunked", "triton"]

REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")
IMPLS: tuple[str, ...] = ("auto", "eager", "chunked", "triton")


class RegHead(NamedTuple):
    """One frozen regularizer head, given to the loss as a linear layer and its input.

    The head's logits are ``r = states @ weight.T + bias`` with ``R(x_<t, v) = σ(r[t, v])``.
    ``regularized_lm_loss`` sends no gradient to any of these tensors.

    Attributes:
        states: [N, Hk] the head's input at every row (often the LM's hidden states).
        weight: [V, Hk] the head's output projection.
        bias: [V] or None.
    """

    states: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None


class LossOutput(NamedTuple):
    """What ``regularized_lm_loss`` returns.

    Attributes:
        loss: the reduced loss (0-dim) or, for ``reduction="none"``, [N] per token. Carries grad.
        ce: [N] fp32, detached: cross-entropy per token (0 on ignored tokens), for logging.
        kl: [N] fp32, detached: KL(q_t ‖ p_t) per token (0 on ignored tokens), for logging.
        n_tokens: 0-dim int64: number of non-ignored tokens (the "mean" denominator).
    """

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    n_tokens: torch.Tensor


class HeadFitOutput(NamedTuple):
    """What ``head_fit_loss`` returns.

    Attributes:
        loss: the reduced loss (0-dim) or, for ``reduction="none"``, [N] per row. Carries grad
            to the head's states, weight and bias.
        bce: [N] fp32, detached: BCE of the head's value for the taken token (0 off the mask).
        consistency: [N] fp32, detached: the consistency term of row t (0 where not paired).
        n_tokens: 0-dim int64: number of rows in the mask (the "mean" denominator).
    """

    loss: torch.Tensor
    bce: torch.Tensor
    consistency: torch.Tensor
    n_tokens: torch.Tensor


@dataclass(frozen=True)
class LossOptions:
    """Non-tensor options of one loss call, validated by the dispatcher.

    Attributes:
        ignore_index: label value of tokens that contribute nothing (``regularized_lm_loss``).
        reduction: ``"mean"`` over non-ignored tokens (0 when all are ignored), ``"sum"`` or
            ``"none"`` ([N] per token).
        chunk_size: rows per chunk for the fused paths; ``None`` picks it from a memory budget.
    """

    ignore_index: int = -100
    reduction: str = "mean"
    chunk_size: int | None = None
