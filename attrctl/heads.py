"""NADO regularizer heads: per position, a logit ``r_t[v]`` for every vocabulary item.

A head reads a **detached** hidden state of the LLM at a tap layer, runs a small body and projects
to the vocabulary. ``R(x_<t, v) = σ(r_t[v])`` estimates the probability that a continuation taking
``v`` next satisfies the attribute (docs/design.md, "The projection"). The fused losses never
see ``[N, V]`` head logits: a head hands them a :class:`~attrctl.losses.RegHead` — its last
features ``[N, Hk]`` and the projection ``[V, Hk]`` + bias — and the loss forms ``r`` chunk by
chunk.

Shapes of one head (``H`` the LLM width at the tap, ``V`` the vocabulary)::

    kind          body                                   features Hk      projection
    linear        none                                   H  (or rank)     [V, H] or [V, rank] + [V]
    mlp           num_layers × (Linear hidden_size, GELU)  hidden_size (or rank)
    transformer   num_layers decoder layers copied from    H  (or rank)
                  the LLM above the tap, then its norm

With ``rank`` set, a bias-free ``Linear(body width → rank)`` sits between body and projection: the
vocabulary projection then costs ``V·rank`` instead of ``V·H`` per token (at rank 64 and H 576, a
ninth). The projection starts at **zero** — ``σ(0) = ½`` everywhere, so ``q = p`` and the
regularizer is exactly zero until a head is fitted.

The tap (:func:`default_tap`): the output of the last *frozen* layer under ``top_layers``
fine-tuning, so the features a head is fitted on are exactly those it reads during fine-tuning;
the final (normed) hidden state otherwise. :func:`forward_with_tap` returns both the final hidden
state (for the LM head) and the tap from one forward pass.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from attrctl.errors import AttrctlError
from attrctl.losses import RegHead
from attrctl.models.arch import decoder_parts, num_layers

if TYPE_CHECKING:  # only the types: heads sit below the policy layer, which builds them
    from attrctl.policy.schema import FineTune, HeadSpec

FINAL = -1  # tap id of the LLM's final (normed) hidden state


def default_tap(spec: HeadSpec, finetune: FineTune, n_layers: int) -> int:
    """The hidden state a head reads: decoder-layer output index (0 = embeddings) or FINAL."""
    if spec.layer is not None:
        if spec.layer > n_layers:
            raise AttrctlError(
                f"head.layer {spec.layer} is past the model's last layer ({n_layers} layers)"
            )
        return spec.layer
    if finetune.method == "top_layers":
        return max(n_layers - finetune.top_layers, 0)
    return FINAL


def forward_with_tap(
    model: Any,
    taps: Sequence[int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **backbone_kwargs: Any,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One forward pass of the decoder; the final hidden state and the requested taps, detached.

    Args:
        model: a transformers causal LM (peft-wrapped or not; DDP callers pass the wrapped module).
        taps: tap ids (decoder-layer output index, 0 = embeddings, or :data:`FINAL`).
        input_ids: [B, T].
        attention_mask: [B, T] or None.
        backbone_kwargs: passed on to the backbone (e.g. ``position_ids`` of packed rows).

    Returns:
        ``(hidden [B, T, H], {tap: [B, T, H] detached})``; ``hidden`` carries the graph.
    """
    parts = decoder_parts(model)
    grabbed: dict[int, torch.Tensor] = {}
    hooks = []
    for tap in set(taps) - {FINAL}:
        module = parts.embed if tap == 0 else parts.layers[tap - 1]

        def hook(_m, _inp, out, tap=tap):
            grabbed[tap] = (out[0] if isinstance(out, tuple) else out).detach()

        hooks.append(module.register_forward_hook(hook))
    try:
        # use_cache=False: no KV cache is built for a training or feature pass
        hidden = parts.backbone(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **backbone_kwargs
        ).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    if FINAL in taps:
        grabbed[FINAL] = hidden.detach()
    return hidden, grabbed


class _MLPBody(nn.Sequential):
    def __init__(self, width_in: int, spec: HeadSpec):
        layers: list[nn.Module] = []
        for i in range(spec.num_layers):
            layers += [nn.Linear(width_in if i == 0 else spec.hidden_size, spec.hidden_size)]
            layers += [nn.GELU()]
        super().__init__(*layers)


class _TransformerBody(nn.Module):
    """Decoder layers copied from the LLM above the tap, then a copy of its final norm.

    Sequences are causal and unpadded on the left (packed training rows, right-padded samples),
    so one additive causal mask serves every row.
    """

    def __init__(self, model: Any, tap: int, spec: HeadSpec):
        super().__init__()
        parts = decoder_parts(model)
        n = len(parts.layers)
        start = n if tap == FINAL else tap
        rotary = getattr(parts.backbone, "rotary_emb", None)
        takes = inspect.signature(type(parts.layers[0]).forward).parameters
        if rotary is None or parts.norm is None or "position_embeddings" not in takes:
            raise AttrctlError(
                f"head kind 'transformer' copies decoder layers that take rotary position "
                f"embeddings (Llama, Qwen2, Gemma, Mistral, Phi-3 …); {parts.arch} has other "
                "layers: use head kind 'linear' or 'mlp'"
            )
        # NADO initialises the head from the layers above the tap; at the top of the stack there
        # are none, so the top layers are copied instead.
        idx = list(range(start, min(start + spec.num_layers, n))) or list(
            range(max(n - spec.num_layers, 0), n)
        )
        self.layers = nn.ModuleList(copy.deepcopy(parts.layers[i]) for i in idx)
        self.norm = copy.deepcopy(parts.norm)
        self.rotary_emb = copy.deepcopy(rotary)
        for p in self.parameters():
            p.requires_grad_(True)
            p.data = p.data.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, H]
        b, t, _ = x.shape
        pos = torch.arange(t, device=x.device).unsqueeze(0).expand(b, t)  # [B, T]
        cos_sin = self.rotary_emb(x, pos)
        mask = torch.full((t, t), float("-inf"), device=x.device).triu(1)[None, None]  # [1,1,T,T]
        for layer in self.layers:
            out = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
            x = out[0] if isinstance(out, tuple) else out
        return self.norm(x)


class RegularizerHead(nn.Module):
    """One attribute's head: body → (rank bottleneck) → zero-initialised vocabulary projection.

    Args:
        spec: the policy's head spec.
        model: the LLM (sizes; the transformer body copies its layers).
        tap: which hidden state the head reads (:func:`default_tap`).
    """

    def __init__(self, spec: HeadSpec, model: Any, tap: int):
        super().__init__()
        self.spec, self.tap = spec, tap
        h = int(model.config.hidden_size)
        vocab = int(model.get_output_embeddings().weight.shape[0])
        if spec.kind == "linear":
            self.body: nn.Module = nn.Identity()
            width = h
        elif spec.kind == "mlp":
            self.body = _MLPBody(h, spec)
            width = spec.hidden_size
        else:
            self.body = _TransformerBody(model, tap, spec)
            width = h
        self.down = nn.Linear(width, spec.rank, bias=False) if spec.rank else None
        k = spec.rank or width
        self.weight = nn.Parameter(torch.zeros(vocab, k))  # [V, Hk], zero: q = p at the start
        self.bias = nn.Parameter(torch.zeros(vocab))  # [V]

    def features(self, tap_hidden: torch.Tensor) -> torch.Tensor:
        """``[B, T, H]`` detached tap states → ``[B, T, Hk]`` features (carry the body's grad)."""
        x = self.body(tap_hidden.float())
        return self.down(x) if self.down is not None else x

    def reg_head(self, tap_hidden: torch.Tensor, *, detach: bool = True) -> RegHead:
        """The head as the fused loss takes it: features ``[B·T, Hk]``, weight ``[V, Hk]``, bias."""
        feats = self.features(tap_hidden)
        feats = feats.reshape(-1, feats.shape[-1])  # [N, Hk]
        if detach:
            return RegHead(feats.detach(), self.weight.detach(), self.bias.detach())
        return RegHead(feats, self.weight, self.bias)

    def logits(self, tap_hidden: torch.Tensor) -> torch.Tensor:
        """Full head logits ``[..., V]`` — for decoding and tests; training never builds these."""
        return self.features(tap_hidden) @ self.weight.t() + self.bias


def build_heads(specs: Sequence[HeadSpec], model: Any, finetune: FineTune) -> nn.ModuleList:
    """One zero-initialised head per attribute, seeded (the caller seeds torch beforehand)."""
    n = num_layers(model)
    return nn.ModuleList(RegularizerHead(s, model, default_tap(s, finetune, n)) for s in specs)


def head_cost(heads: nn.ModuleList) -> dict[str, int]:
    """Trainable parameters of the heads, for logs."""
    return {"parameters": sum(p.numel() for p in heads.parameters())}


def head_taps(heads: torch.nn.ModuleList) -> list[int]:
    """The taps the heads read, each once: layer indices in order, the final state last."""
    return sorted({h.tap for h in heads}, key=lambda t: (t == FINAL, t))
