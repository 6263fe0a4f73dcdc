"""The final model of a run as a transformers folder (``model/final``)."""

from __future__ import annotations

from typing import Any

from attrctl.paths import atomic_dir


def save_final(ctx: Any) -> None:
    """θ_I (LoRA merged) with its tokenizer, ``save_pretrained`` as safetensors."""
    from attrctl.train.weights import load_theta

    model, tok = load_theta(ctx, ctx.policy.schedule.iterations, "sample")
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line in the summary says where the model is
    with atomic_dir(ctx.run.model("final")) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
