"""The loaded-model record every loader returns, and greedy generation on it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, and where they came from.

    Attributes:
        model: the transformers causal LM, in eval mode, on the requested device and dtype.
        tokenizer: its tokenizer; always has a pad token and pads on the left (for generation).
        spec: the spec it was loaded from, as given (``bundled:…``, ``tiny-random``, hub id, path).
        source: where the weights were actually read from (a folder, a hub id, or ``random``).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: str
    source: str

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary: architecture, parameter count, vocabulary, dtype, source, shape."""
        cfg = self.model.config
        archs = getattr(cfg, "architectures", None) or [type(self.model).__name__]
        return {
            "spec": self.spec,
            "source": self.source,
            "architecture": archs[0],
            "model_type": cfg.model_type,
            # num_parameters() counts a tied embedding/LM-head matrix once, as model cards do.
            "parameters": self.model.num_parameters(),
            "vocab_size": int(cfg.vocab_size),
            "tokenizer_size": len(self.tokenizer),
            "num_layers": int(cfg.num_hidden_layers),
            "hidden_size": int(cfg.hidden_size),
            "tied_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "device": str(self.model.device),
        }


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token (EOS if it has none) and left padding.

    Left padding keeps the last real token of every row at position -1, which is what batched
    generation needs; training code that prefers right padding can switch it per call.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def finish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: str) -> None:
    """Common last steps for every loader: device, eval mode, pad id for generate()."""
    model.to(device)
    model.eval()  # no dropout: outputs are a deterministic function of the inputs
    prepare_tokenizer(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def greedy_generate(
    loaded: LoadedModel, prompts: str | list[str], max_new_tokens: int = 20
) -> str | list[str]:
    """Greedy (argmax) continuation of one prompt or a batch; returns only the new text.

    Args:
        loaded: a model from :func:`attrctl.models.load_model`.
        prompts: a prompt, or a list of prompts (left-padded into one batch).
        max_new_tokens: at most this many tokens are generated per prompt.

    Returns:
        The continuation (special tokens removed), a string or a list matching ``prompts``.
    """
    import torch
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    tok, model = loaded.tokenizer, loaded.model
    enc = tok(batch, return_tensors="pt", padding=True).to(model.device)  # [B, T]
    # A fresh config: the checkpoint's own may carry sampling defaults (temperature, top_p)
    # that would warn or, worse, turn greedy decoding into sampling.
    gen = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id,
        eos_token_id=model.generation_config.eos_token_id or tok.eos_token_id,
    )
    with torch.no_grad():
        out = model.generate(**enc, generation_config=gen)  # [B, T + new]
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return texts[0] if isinstance(prompts, str) else texts


@contextlib.contextmanager
def no_hf_progress_bar() -> Iterator[None]:
    """Hide transformers' "Loading weights" bar (a fraction of a second for these models; between
    attrctl's own bars, and in every log file, it is noise)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
