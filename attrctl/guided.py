"""NADO guided decoding: a transformers ``LogitsProcessor`` that samples from ``q`` instead of ``p``.

With a run's fitted heads ``r_k`` (docs/design.md, "NADO decoding"), each step's logits become

    log q_t = ℓ_t + α · Σ_k w_k · logσ(r_{k,t})          (softmax normalises; α = ``strength``)

so a token whose continuations the heads expect to violate an attribute is down-weighted by
``R = σ(r)``. Zero heads (``σ(0) = ½`` everywhere) shift every logit of a row by the same constant
and leave the distribution unchanged.

The heads read hidden states at their taps (:func:`attrctl.heads.forward_with_tap`: tap ``i`` is
the output of decoder layer ``i`` counted from 1, tap 0 the embeddings, :data:`~attrctl.heads.FINAL`
the final normed state). The processor captures them with forward hooks **during the model's own
forward** — HF ``generate`` or :func:`attrctl.sampling.sample_continuations` — so guidance costs no
second pass. ``linear`` and ``mlp`` heads need the last position only. ``transformer`` heads attend
over positions, so the processor keeps every row's tap states since the start of the sequence
(prefill ``[B, P, H]``, then ``[B, 1, H]`` per step) and, because its body assumes unpadded rows,
moves each row's real tokens (attention mask 1) to the front before running it: a left-padded
batch gives each row what it would get alone.

Use from Python::

    proc = load_guidance("runs/toxicity", model)          # the run's last fitted heads
    enc = attrctl.sampling.encode_prompts(tok, prompts)   # as the heads were fitted (BOS rule)
    with proc:
        out = model.generate(**enc, logits_processor=LogitsProcessorList([proc]))
    # or: sample_continuations(model, tok, prompts, seeds, max_new_tokens=40, logits_processor=proc)

The hooks stay on the model until :meth:`NadoLogitsProcessor.close` (or the ``with`` block ends);
while attached they record every forward of the model. Beam search reorders rows between steps,
which the per-row buffers of ``transformer`` heads do not follow: use greedy decoding or sampling.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor

from attrctl.errors import AttrctlError
from attrctl.heads import FINAL, RegularizerHead
from attrctl.models.arch import decoder_parts
from attrctl.train.rundir import FinishedRun, is_run_dir, open_finished_run


class NadoLogitsProcessor(LogitsProcessor):
    """Adds ``α · Σ_k w_k logσ(r_k)`` at the last position to each step's logits.

    Args:
        model: the causal LM being decoded (its forward is hooked; peft-wrapped works too).
        heads: the regularizer heads (e.g. from :func:`attrctl.heads_io.load_heads`).
        weights: ``w_k`` per head (the policy's attribute weights); default 1 each.
        strength: ``α``; 0 turns guidance off, larger values steer harder.

    Attributes:
        last_guidance: the last term added, ``[B, V]`` float32, before ``α`` (for inspection).
    """

    def __init__(
        self,
        model: Any,
        heads: Sequence[RegularizerHead],
        weights: Sequence[float] | None = None,
        *,
        strength: float = 1.0,
    ):
        heads = list(heads)
        if not heads:
            raise ValueError("guided decoding needs at least one regularizer head")
        weights = [1.0] * len(heads) if weights is None else [float(w) for w in weights]
        if len(weights) != len(heads):
            raise ValueError(f"got {len(weights)} weights for {len(heads)} heads")
        if not strength >= 0:
            raise ValueError(f"strength must be >= 0, got {strength}")
        device = next(model.parameters()).device
        self.model, self.weights, self.strength = model, weights, float(strength)
        self.heads = [h.to(device).eval().requires_grad_(False) for h in heads]
        self.last_guidance: torch.Tensor | None = None
        self._history = any(h.spec.kind == "transformer" for h in heads)
        self._last: dict[int, torch.Tensor] = {}  # tap → [B, H] at the last position
        self._chunks: dict[int, list[torch.Tensor]] = {}  # tap → [B, t, H] per forward
        self._mask: torch.Tensor | None = None  # [B, T] the latest forward's attention mask
        self._hooks: list[Any] = []
        self._attach()

    # ---------------------------------------------------------------------------- hooks
    def _attach(self) -> None:
        parts = decoder_parts(self.model)
        dec = parts.backbone
        self._hooks.append(dec.register_forward_pre_hook(self._on_start, with_kwargs=True))
        for tap in sorted({h.tap for h in self.heads}):
            if tap == FINAL:
                module = dec  # its output's last_hidden_state is the final normed state
            elif tap == 0:
                module = parts.embed
            else:
                if tap > len(parts.layers):
                    raise AttrctlError(
                        f"a head reads layer {tap} but the model has {len(parts.layers)} layers: "
                        "the heads belong to another model"
                    )
                module = parts.layers[tap - 1]
            self._hooks.append(module.register_forward_hook(self._grabber(tap)))

    def _on_start(self, _module, args, kwargs) -> None:
        """Before each decoder forward: a new sequence (nothing cached) empties the buffers."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        if past == 0:
            self._last, self._chunks = {}, {}
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _grabber(self, tap: int):
        def grab(_module, _inp, out) -> None:
            if hasattr(out, "last_hidden_state"):
                out = out.last_hidden_state
            x = (out[0] if isinstance(out, tuple) else out).detach()  # [B, t, H]
            self._last[tap] = x[:, -1]  # [B, H]
            if self._history:
                self._chunks.setdefault(tap, []).append(x)

        return grab

    def close(self) -> None:
        """Remove the hooks from the model and drop the buffers (idempotent)."""
        for h in self._hooks:
            h.remove()
        self._hooks, self._last, self._chunks, self._mask = [], {}, {}, None

    def __enter__(self) -> NadoLogitsProcessor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------------- guidance
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` ``[B, V]`` (the step's next-token logits) → ``scores + α Σ_k w_k logσ(r_k)``."""
        if not self._hooks:
            raise RuntimeError("this NadoLogitsProcessor is closed; build a new one")
        with torch.no_grad():
            total = torch.zeros(scores.shape, dtype=torch.float32, device=scores.device)  # [B, V]
            for head, w in zip(self.heads, self.weights, strict=True):
                feats = self._features(head, input_ids)  # [B, Hk]
                r = feats @ head.weight.t() + head.bias  # [B, V]
                if r.shape != scores.shape:
                    raise AttrctlError(
                        f"the heads score {r.shape[-1]} tokens per row but the model's logits "
                        f"have {scores.shape[-1]}: the heads belong to another model"
                    )
                total += w * F.logsigmoid(r).to(total.device)  # logσ: stable for large |r|
        self.last_guidance = total
        return scores + (self.strength * total).to(scores.dtype)

    def _features(self, head: RegularizerHead, input_ids: torch.Tensor) -> torch.Tensor:
        """The head's features at each row's last position, ``[B, Hk]``."""
        if head.tap not in self._last:
            raise RuntimeError(
                "no hidden state was captured: call the processor only from the model's generation "
                "loop (HF generate or attrctl.sampling.sample_continuations), after a forward"
            )
        if head.spec.kind != "transformer":
            return head.features(self._last[head.tap])  # [B, H] → [B, Hk]
        states = torch.cat(self._chunks[head.tap], dim=1)  # [B, T, H] every position so far
        b, t, _ = states.shape
        if t != input_ids.shape[1]:
            raise RuntimeError(
                f"a transformer head needs the tap states of every position: {t} were captured "
                f"for {input_ids.shape[1]} tokens (attach the processor before generation starts; "
                "beam search is not supported)"
            )
        mask = self._mask if self._mask is not None and self._mask.shape == (b, t) else None
        if mask is None:
            real = torch.ones(b, t, dtype=torch.bool, device=states.device)  # [B, T]
        else:
            real = mask.to(states.device).bool()  # [B, T] 1 = a real token, 0 = left padding
        # Move each row's real tokens to the front (stable: order kept). The body is causal, so
        # the trailing pad states cannot reach a real position; it then sees the row unpadded.
        order = torch.sort((~real).int(), dim=1, stable=True).indices  # [B, T]
        packed = states.gather(1, order[..., None].expand_as(states))  # [B, T, H]
        lengths = real.sum(1).clamp(min=1)  # [B]
        feats = head.features(packed[:, : int(lengths.max())])  # [B, L, Hk]
        return feats[torch.arange(b, device=feats.device), lengths - 1]  # [B, Hk]


# ------------------------------------------------------------------------------ from a run
@dataclass(frozen=True)
class GuidanceSource:
    """Where a run's (or an exported folder's) heads and policy are."""

    root: Path
    policy_path: Path
    heads_dir: Path


def guidance_source(source: FinishedRun | str | os.PathLike) -> GuidanceSource:
    """The heads and policy of a finished run, or of a folder written by ``attrctl export``.

    Raises:
        AttrctlError: not a finished run or export folder, or it holds no fitted heads.
    """
    if not isinstance(source, FinishedRun):
        path = Path(source).expanduser()
        exported = path / "heads" / "heads.safetensors"
        if not is_run_dir(path) and (path / "policy.yaml").is_file() and exported.is_file():
            return GuidanceSource(path, path / "policy.yaml", exported.parent)
        if not is_run_dir(path) and path.is_dir():
            raise AttrctlError(
                f"{path}: guided decoding needs a training run directory or an `attrctl export` "
                "folder (its policy.yaml and heads); this is neither"
            )
        source = open_finished_run(path)
    if source.heads_dir is None:
        raise AttrctlError(
            f"{source.root}: the run has no fitted regularizer heads (no fit job in state.json "
            "fitted any), so there is nothing to guide with"
        )
    return GuidanceSource(source.root, source.policy_path, source.heads_dir)


def load_guidance(
    source: FinishedRun | str | os.PathLike, model: Any, *, strength: float = 1.0
) -> NadoLogitsProcessor:
    """A guided-decoding processor for ``model`` from a run's last fitted heads.

    The run's policy is compiled to build its heads (kinds, ranks, taps sized for ``model``); the
    attribute weights ``w_k`` come from it too. ``model`` is usually the run's ``model/final``; the
    base model gives the paper's *NADO decoding* baseline.

    Args:
        source: a :class:`FinishedRun`, a run directory, or an ``attrctl export`` folder.
        model: the causal LM that will be decoded.
        strength: ``α`` in ``ℓ + α Σ_k w_k logσ(r_k)``.

    Raises:
        AttrctlError: no finished run there, no fitted heads, or heads that do not fit the model.
    """
    from attrctl.heads_io import load_heads
    from attrctl.policy import compile_policy, load_policy

    src = guidance_source(source)
    compiled = compile_policy(load_policy(src.policy_path))
    heads = load_heads(compiled, model, src.heads_dir)
    return NadoLogitsProcessor(model, heads, compiled.attr_weights, strength=strength)
