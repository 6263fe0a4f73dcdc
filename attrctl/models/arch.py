"""Where a causal LM keeps its parts: the one place attrctl knows transformers' architectures.

Heads read a hidden state tapped from a decoder layer, guided decoding hooks those layers,
``top_layers`` fine-tuning unfreezes the last few of them and the fused loss projects the final
hidden state through the LM head's weight. Each of these asks :func:`decoder_parts` instead of
naming a module itself, so an architecture is supported here or nowhere.

transformers gives every decoder-only model ``get_decoder()`` (the backbone that returns
``last_hidden_state``) but not one name for what is inside it::

    family                         embeddings       layers   final norm
    Llama, Qwen2, Gemma, Mistral,  embed_tokens     layers   norm
    Phi-3, SmolLM, OLMo …
    GPT-NeoX / Pythia              embed_in         layers   final_layer_norm
    Falcon                         word_embeddings  h        ln_f
    GPT-2, GPT-J, CodeGen          wte              h        ln_f
    OPT                            embed_tokens     layers   final_layer_norm

An architecture whose logits are not ``final_hidden @ lm_head.weight.T`` (logit soft-capping, a
logit scale, a bias on the LM head) is refused by name: the fused loss and the heads' KL would
otherwise train against logits the model never produces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attrctl.errors import AttrctlError

EMBED_NAMES = ("embed_tokens", "wte", "embed_in", "word_embeddings")
LAYER_NAMES = ("layers", "h", "blocks")
NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
# config fields that put something between final_hidden @ W.T and the logits
LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "lm_head_multiplier",
    "output_multiplier",
)


@dataclass(frozen=True)
class DecoderParts:
    """The modules of one causal LM that attrctl touches.

    Attributes:
        arch: the model's class name, for messages.
        backbone: ``model.get_decoder()``: ``backbone(input_ids=…, attention_mask=…,
            use_cache=False).last_hidden_state`` is the final (normed) hidden state.
        embed: the token embedding (its output is tap 0).
        layers: the decoder layers in order (layer ``i``'s output is tap ``i + 1``).
        norm: the final norm, or None where the architecture has none.
    """

    arch: str
    backbone: Any
    embed: Any
    layers: Any
    norm: Any | None


def _first(module: Any, names: tuple[str, ...]) -> Any | None:
    for name in names:
        child = getattr(module, name, None)
        if child is not None:
            return child
    return None


def unsupported(model: Any, why: str) -> AttrctlError:
    return AttrctlError(
        f"{_arch(model)}: {why}; attrctl supports decoder-only transformers causal LMs whose "
        "logits are the final hidden state times the LM head's weight (docs/models-data.md, "
        "'Architectures')"
    )


def _arch(model: Any) -> str:
    base = getattr(model, "get_base_model", None)  # a peft model: name the model inside
    inner = base() if callable(base) else model
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    name = type(inner).__name__
    return f"{name} (model_type {model_type!r})" if model_type else name


def decoder_parts(model: Any) -> DecoderParts:
    """The backbone, embeddings, layers and final norm of ``model`` (peft-wrapped or not).

    Raises:
        AttrctlError: ``model`` is not a decoder-only causal LM attrctl can handle; the message
            names its class and what is missing.
    """
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        raise unsupported(model, "it is an encoder-decoder model")
    get = getattr(model, "get_decoder", None)
    backbone = get() if callable(get) else None
    if backbone is None:
        raise unsupported(model, "it has no decoder backbone (model.get_decoder())")
    layers = _first(backbone, LAYER_NAMES)
    embed = _first(backbone, EMBED_NAMES)
    if layers is None or embed is None:
        what = "decoder layers" if layers is None else "token embedding"
        raise unsupported(
            model,
            f"cannot find its {what} in {type(backbone).__name__} (looked for "
            f"{', '.join(LAYER_NAMES if layers is None else EMBED_NAMES)})",
        )
    return DecoderParts(_arch(model), backbone, embed, layers, _first(backbone, NORM_NAMES))


def check_linear_lm_head(model: Any) -> None:
    """Refuse a model whose logits are not ``final_hidden @ W.T`` (see the module docstring)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for field in LOGIT_TRANSFORMS:
        value = getattr(text, field, None)
        if value not in (None, 1, 1.0, 0, 0.0, False):
            raise unsupported(model, f"its config sets {field}={value!r}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise unsupported(model, "it has no output embedding (model.get_output_embeddings())")
    if getattr(head, "bias", None) is not None:
        raise unsupported(model, "its LM head has a bias")


def num_layers(model: Any) -> int:
    """How many decoder layers ``model`` has."""
    return len(decoder_parts(model).layers)
