"""The regularizer inside a transformers ``Trainer`` or TRL ``SFTTrainer``.

:func:`apply_regularizer` patches a causal LM's forward the way Liger-Kernel's ``lce_forward``
does: in training, given ``labels``, it returns ``loss = CE + λ_t·KL(sg[q_t] ‖ p_t)`` computed by
attrctl's fused loss from the final hidden states and the LM head's weight, with ``logits=None``
(the ``[B, T, V]`` logits are never built). In evaluation, without labels, or under ``no_grad`` it
is the model's own forward, logits and all, so ``generate`` and evaluation are unchanged::

    from attrctl.hf import apply_regularizer

    reg = apply_regularizer(model, "runs/toxicity", lam={"toxic": 10.0, "general": 0.1},
                            column="domain")        # heads from an attrctl run or export folder
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=reg.collator(DataCollatorForLanguageModeling(tok, mlm=False)))
    trainer.train()

The loss is a **sum over the batch's label tokens divided by** ``num_items_in_batch`` when the
Trainer passes it (it counts the label tokens of every micro-batch of the optimizer step, and of
every rank), so gradient accumulation 2 × 4 gives the gradient of 1 × 8; without it (evaluation,
or a caller that does not pass it) the loss is the mean over the micro-batch's tokens. The patched
forward takes ``**kwargs`` and the model says ``accepts_loss_kwargs``, so the Trainer passes the
count and does not divide the loss again.

Per-token λ: ``lam`` is one number, or a mapping from a dataset column's values (e.g. the domain
name) to numbers; :meth:`RegularizerPatch.collator` turns the column into an ``attrctl_lam``
tensor (``[B]`` per example, or ``[B, T]`` for a column of per-token lists). The column's name is
added to the forward's signature so the Trainer's ``remove_unused_columns`` keeps it.

Refused, with a message, rather than silently wrong:

- a PEFT adapter on the LM head (the fused loss reads ``lm_head.weight`` and would skip it);
- an architecture whose logits are not ``final_hidden @ W.T`` (:mod:`attrctl.models.arch`);
- a trainer that runs the backbone in training without this forward — TRL's ``SFTTrainer``
  computes its loss through its own fused LM head; wrap it: ``regularized(SFTTrainer)(...)``.
"""

from __future__ import annotations

import inspect
import os
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from attrctl.errors import AttrctlError
from attrctl.heads import forward_with_tap, head_taps
from attrctl.losses import RegHead, regularized_lm_loss
from attrctl.models.arch import check_linear_lm_head, decoder_parts

LAM_KEY = "attrctl_lam"  # the batch key the collator fills and the forward reads


@dataclass(frozen=True)
class Regularizer:
    """Frozen heads and their attribute weights, ready to regularize a model's fine-tune.

    Attributes:
        heads: the regularizer heads (:class:`attrctl.heads.RegularizerHead`), frozen.
        attr_weights: ``w_k`` per head.
        source: where they were read from, for messages.
    """

    heads: torch.nn.ModuleList
    attr_weights: list[float]
    source: str

    @classmethod
    def load(cls, source: str | os.PathLike, model: Any) -> Regularizer:
        """The last fitted heads of an attrctl run, or the ``heads/`` of an ``attrctl export``
        folder, built for ``model`` (the policy that fitted them decides kinds, ranks and taps).

        Raises:
            AttrctlError: no run or export folder there, no fitted heads, or heads that do not
                fit ``model`` (another vocabulary or width).
        """
        from attrctl.guided import guidance_source
        from attrctl.heads_io import load_heads
        from attrctl.policy import compile_policy, load_policy

        src = guidance_source(source)
        compiled = compile_policy(load_policy(src.policy_path))
        heads = load_heads(compiled, _transformers_model(model), src.heads_dir)
        heads.requires_grad_(False).eval()
        return cls(heads, list(compiled.attr_weights), str(src.root))


@dataclass
class RegularizerPatch:
    """What :func:`apply_regularizer` did to a model; undo it with :meth:`remove`.

    Attributes:
        model: the patched transformers model.
        regularizer: the heads.
        lam: λ (a number) or the mapping from the λ column's values to λ.
        column: the dataset column holding each example's λ key (None: one λ for all).
        last: ``{"ce": …, "kl": …, "tokens": …}`` of the latest training forward (means over its
            label tokens), for logging.
    """

    model: Any
    regularizer: Regularizer
    lam: float | Mapping[str, float]
    column: str | None
    impl: str
    chunk_size: int | None
    last: dict[str, float] = field(default_factory=dict)
    _original: Callable | None = None
    _own_forward: bool = False
    _hook: Any = None
    _inside: bool = False

    # ------------------------------------------------------------------ λ of the batch
    def lam_of(self, value: Any) -> float:
        """λ of one example's column value (a number, or a key of the ``lam`` mapping)."""
        if isinstance(value, bool):
            raise AttrctlError(f"λ column {self.column!r}: {value!r} is not a number or a key")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(self.lam, Mapping) and value in self.lam:
            return float(self.lam[value])
        known = ", ".join(map(repr, self.lam)) if isinstance(self.lam, Mapping) else "none"
        raise AttrctlError(
            f"λ column {self.column!r}: no λ for value {value!r} (known values: {known}); add "
            "it to apply_regularizer's lam mapping"
        )

    def collator(self, base: Callable[[list[dict]], dict]) -> Callable[[list[dict]], dict]:
        """Wrap a data collator: each feature's λ column becomes ``batch["attrctl_lam"]``."""
        if self.column is None:
            return base

        def collate(features: list[dict]) -> dict:
            lams = []
            for f in features:
                if self.column not in f:
                    raise AttrctlError(
                        f"a training example has no {self.column!r} column (apply_regularizer "
                        f"column={self.column!r}); keep it in the dataset, or pass column=None"
                    )
                f = dict(f)
                value = f.pop(self.column)
                lams.append([self.lam_of(v) for v in value] if isinstance(value, list)
                            else self.lam_of(value))  # fmt: skip
            batch = base([{k: v for k, v in f.items() if k != self.column} for f in features])
            if all(isinstance(x, float) for x in lams):
                batch[LAM_KEY] = torch.tensor(lams, dtype=torch.float32)  # [B]
            else:
                batch[LAM_KEY] = _per_token(lams, batch["labels"].shape)  # [B, T]
            return batch

        return collate

    def remove(self) -> None:
        """Give the model its own forward back."""
        if self._original is not None:
            if self._own_forward:  # the instance had a forward of its own: put it back
                self.model.forward = self._original
            else:
                vars(self.model).pop("forward", None)
            self._original = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        vars(self.model).pop("accepts_loss_kwargs", None)
        vars(self.model).pop("_attrctl_patch", None)

    # ------------------------------------------------------------------ the loss
    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, *, attention_mask: Any,
             lam: torch.Tensor | None, num_items_in_batch: Any, shift_labels: Any,
             backbone_kwargs: dict) -> torch.Tensor:  # fmt: skip
        """``Σ_t (CE_t + λ_t·KL_t) / num_items_in_batch`` (or the mean) over the label tokens."""
        model, reg = self.model, self.regularizer
        reg.heads.to(input_ids.device)
        taps = head_taps(reg.heads)
        self._inside = True
        try:
            hidden, tapped = forward_with_tap(model, taps, input_ids, attention_mask,
                                              **backbone_kwargs)  # fmt: skip
        finally:
            self._inside = False
        if shift_labels is None:  # position t predicts label t + 1
            hidden, labels = hidden[:, :-1], labels[:, 1:]
            tapped = {t: h[:, :-1] for t, h in tapped.items()}
            lam = lam[:, 1:] if lam is not None and lam.dim() == 2 else lam
        else:
            labels = shift_labels
        b, t = labels.shape
        h = hidden.reshape(b * t, -1)  # [N, H]
        y = labels.reshape(-1).to(h.device)  # [N]
        lam_t = self._lam_tensor(lam, b, t, h.device)  # [N]
        reg_heads = []
        with torch.no_grad():
            for head in reg.heads:
                feats = head.features(tapped[head.tap]).reshape(b * t, -1)  # [N, Hk]
                reg_heads.append(RegHead(feats, head.weight, head.bias))
        out = regularized_lm_loss(
            h, model.get_output_embeddings().weight, y, reg_heads, lam=lam_t,
            attr_weights=reg.attr_weights, reduction="sum", impl=self.impl,
            chunk_size=self.chunk_size,
        )  # fmt: skip
        n = max(int(out.n_tokens), 1)
        self.last = {"ce": float(out.ce.sum()) / n, "kl": float(out.kl.sum()) / n, "tokens": n}
        if num_items_in_batch is None:
            return out.loss / n
        return out.loss / torch.as_tensor(num_items_in_batch, device=out.loss.device).clamp(min=1)

    def _lam_tensor(self, lam: torch.Tensor | None, b: int, t: int, device) -> torch.Tensor:
        if lam is None:
            if isinstance(self.lam, Mapping):
                raise AttrctlError(
                    f"the batch carries no {LAM_KEY!r}: with a λ mapping, build batches with "
                    "RegularizerPatch.collator(your_collator)"
                )
            return torch.full((b * t,), float(self.lam), device=device)
        lam = lam.to(device=device, dtype=torch.float32)
        if lam.dim() == 1:  # [B] one λ per example
            return lam[:, None].expand(b, t).reshape(-1)
        return lam.reshape(-1)


def _per_token(lams: list, shape: torch.Size) -> torch.Tensor:
    """``[B, T]`` λ from per-example numbers or per-token lists (right-padded with 0)."""
    out = torch.zeros(shape, dtype=torch.float32)
    for r, value in enumerate(lams):
        row = value if isinstance(value, list) else [value] * shape[1]
        n = min(len(row), shape[1])
        out[r, :n] = torch.tensor(row[:n], dtype=torch.float32)
    return out


def _transformers_model(model: Any) -> Any:
    """The transformers model inside a peft wrapper (or the model itself)."""
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) else model


def _check_lm_head(model: Any) -> None:
    head = model.get_output_embeddings()
    kind = type(head)
    if kind.__module__.startswith("peft") or hasattr(head, "lora_A") or hasattr(head, "base_layer"):
        raise AttrctlError(
            f"the LM head is wrapped by a PEFT adapter ({kind.__name__}): attrctl's fused loss "
            "reads lm_head.weight directly and would skip the adapter. Leave lm_head out of "
            "target_modules / modules_to_save (TRL refuses its fused losses the same way)"
        )


def apply_regularizer(
    model: Any,
    heads: Regularizer | str | os.PathLike,
    *,
    lam: float | Mapping[str, float] = 1.0,
    column: str | None = None,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> RegularizerPatch:
    """Make ``model``'s training forward return attrctl's regularized loss.

    Args:
        model: a transformers causal LM, or a peft model wrapping one (the transformers model
            inside is patched; apply before or after ``get_peft_model``).
        heads: a :class:`Regularizer`, or an attrctl run / export folder to load one from.
        lam: λ for every token, or a mapping from the values of ``column`` to λ.
        column: the dataset column with each example's λ key or number (a list of numbers per
            token also works); None: ``lam`` is one number for every token.
        impl, chunk_size: the fused loss' implementation and chunk (``attrctl.losses``).

    Returns:
        The :class:`RegularizerPatch` (its ``collator`` builds the λ column's batches).

    Raises:
        AttrctlError: the model, its LM head or the heads cannot be regularized (the message
            says why), or ``lam`` is a mapping without a ``column``.
    """
    target = _transformers_model(model)
    decoder_parts(target)
    check_linear_lm_head(target)
    _check_lm_head(target)
    if isinstance(lam, Mapping) and column is None:
        raise AttrctlError("apply_regularizer: a λ mapping needs column= (the key of each example)")
    if getattr(target, "_attrctl_patch", None) is not None:
        raise AttrctlError("apply_regularizer: this model is already patched; remove() it first")
    reg = heads if isinstance(heads, Regularizer) else Regularizer.load(heads, target)
    patch = RegularizerPatch(target, reg, lam, column, impl, chunk_size)
    original = target.forward
    patch._original, patch._own_forward = original, "forward" in vars(target)

    def forward(self, input_ids=None, attention_mask=None, labels=None, *,
                num_items_in_batch=None, attrctl_lam=None, shift_labels=None, **kwargs):  # fmt: skip
        if column is not None and column in kwargs:
            raise AttrctlError(
                f"the batch still holds the raw {column!r} column: build batches with "
                "RegularizerPatch.collator(your_collator)"
            )
        if kwargs.get("fused_lm_head"):
            raise AttrctlError(_BYPASS)
        training = self.training and torch.is_grad_enabled() and labels is not None
        if training and kwargs.get("inputs_embeds") is not None:
            raise AttrctlError(
                "attrctl's regularizer trains from input_ids (its heads tap the layers of the "
                "token sequence); this batch gives inputs_embeds"
            )
        if not training:
            extra = {"labels": labels} if labels is not None else {}
            if num_items_in_batch is not None:
                extra["num_items_in_batch"] = num_items_in_batch
            if shift_labels is not None:
                extra["shift_labels"] = shift_labels
            patch._inside = True  # the model's own forward: not a bypass
            try:
                return original(input_ids=input_ids, attention_mask=attention_mask, **extra,
                                **kwargs)  # fmt: skip
            finally:
                patch._inside = False
        from transformers.modeling_outputs import CausalLMOutputWithPast

        position_ids = kwargs.get("position_ids")  # padding-free batches carry them
        loss = patch.loss(
            input_ids, labels, attention_mask=attention_mask, lam=attrctl_lam,
            num_items_in_batch=num_items_in_batch, shift_labels=shift_labels,
            backbone_kwargs={} if position_ids is None else {"position_ids": position_ids},
        )  # fmt: skip
        return CausalLMOutputWithPast(loss=loss, logits=None)

    params = list(inspect.signature(original).parameters.values())
    names = {p.name for p in params}
    kw = inspect.Parameter.KEYWORD_ONLY
    added = [inspect.Parameter(n, kw, default=None)
             for n in ("num_items_in_batch", LAM_KEY, *([column] if column else []))
             if n not in names]  # fmt: skip
    var = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    rest = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    rest = [p for p in rest if p.kind is not kw] + [p for p in rest if p.kind is kw]
    bound = types.MethodType(forward, target)
    bound_fn = bound.__func__
    bound_fn.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *rest, *added,
         *(var or [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])]
    )  # fmt: skip
    target.forward = bound
    target.accepts_loss_kwargs = True  # the Trainer passes num_items_in_batch, divides no more
    target._attrctl_patch = patch

    def guard(_module, _args):  # the backbone ran in training without the patched forward
        if target.training and torch.is_grad_enabled() and not patch._inside:
            raise AttrctlError(_BYPASS)

    patch._hook = decoder_parts(target).backbone.register_forward_pre_hook(guard)
    return patch


_BYPASS = (
    "the model's backbone ran in training without attrctl's regularized forward, so the "
    "regularizer would be skipped. TRL's SFTTrainer computes its loss through its own fused LM "
    "head: build the trainer as attrctl.hf.regularized(SFTTrainer)(...)"
)


class RegularizedLossMixin:
    """A Trainer mixin whose training loss is the patched forward's (see :func:`regularized`)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(  # type: ignore[misc]
                model, inputs, return_outputs=return_outputs,
                num_items_in_batch=num_items_in_batch,
            )  # fmt: skip
        inputs = {k: v for k, v in inputs.items() if k not in ("fused_lm_head", "use_cache")}
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
        loss = outputs.loss
        args = self.args  # type: ignore[attr-defined]
        if args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every rank's tokens and DDP averages gradients
            loss = loss * self.accelerator.num_processes  # type: ignore[attr-defined]
        return (loss, outputs) if return_outputs else loss


def regularized(trainer_cls: type) -> type:
    """``trainer_cls`` with its training loss taken from the patched forward.

    Needed for trainers that compute the loss themselves instead of reading the model's
    ``loss`` — TRL's ``SFTTrainer`` (its fused LM head). ``transformers.Trainer`` works as is.
    """
    return type(f"Regularized{trainer_cls.__name__}", (RegularizedLossMixin, trainer_cls), {})
