"""The regularized fine-tuning losses, behind one dispatcher with an explicit ``impl``.

Public API:

* :func:`token_kl` — KL(q_t ‖ p_t) per row from given logits (the I-projection regularizer).
* :func:`regularized_lm_loss` — fused-linear ``CE + λ_t·KL(sg[q_t] ‖ p_t)`` from hidden states
  and the LM head weight; the fast paths hold the logits of ``C`` rows at a time, never the
  ``[N, V]`` of the whole batch once N exceeds C (:func:`attrctl.losses.chunked.pick_chunk_size`).
* :func:`head_fit_loss` — the NADO head loss (BCE on the taken token + μ·consistency), fused the
  same way, with gradients to the head.

``impl`` is one of ``"eager"`` (reference, fp32, full logits), ``"chunked"`` (pure PyTorch, row
chunks), ``"triton"`` (GPU kernels in ``attrctl.kernels``; CPU under ``TRITON_INTERPRET=1``) or
``"auto"`` (triton on CUDA when Triton imports, else chunked; logged once on the
``attrctl.losses`` logger). Importing this module imports neither Triton nor the kernels.
"""

from __future__ import annotations

from attrctl.losses.dispatch import (
    head_fit_loss,
    regularized_lm_loss,
    resolve_impl,
    token_kl,
)
from attrctl.losses.types import HeadFitOutput, LossOptions, LossOutput, RegHead

__all__ = [
    "HeadFitOutput",
    "LossOptions",
    "LossOutput",
    "RegHead",
    "head_fit_loss",
    "regularized_lm_loss",
    "resolve_impl",
    "token_kl",
]
