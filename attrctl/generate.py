"""``attrctl generate``: sample continuations of a prompt, plain or NADO-guided.

Sampling goes through the one sampler (:func:`attrctl.sampling.sample_continuations`) with the
seeds of :func:`attrctl.sampling.row_seed`, so sample ``k`` of a prompt is the same whatever ``n``
is, and the same as eval and training would draw with that seed. Guidance is
:class:`attrctl.guided.NadoLogitsProcessor` with a run's last fitted heads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from attrctl.errors import AttrctlError

PROMPT_SET = "generate"  # the prompt-set label in row seeds


@dataclass(frozen=True)
class Generation:
    """One sampled continuation.

    Attributes:
        prompt: the prompt text.
        text: the continuation (special tokens removed).
        sample: its index among the prompt's samples.
        seed: the row seed it was drawn with.
        tokens: how many tokens were sampled (the stop token excluded).
    """

    prompt: str
    text: str
    sample: int
    seed: int
    tokens: int


@dataclass(frozen=True)
class GenerateResult:
    """What was sampled, from which model, guided by what."""

    model: str
    guided_by: str | None
    strength: float
    generations: list[Generation]


def resolve_model_spec(spec: str | os.PathLike) -> str:
    """A run directory stands for its final model; any other spec passes through unchanged."""
    from attrctl.train.rundir import is_run_dir, open_finished_run

    if is_run_dir(spec):
        return str(open_finished_run(spec).model_dir)
    return str(spec)


def generate(
    model: str | os.PathLike,
    prompts: str | Sequence[str],
    *,
    n: int = 1,
    max_new_tokens: int = 40,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    guided: bool = False,
    heads: str | os.PathLike | None = None,
    strength: float = 1.0,
    device: str = "cpu",
) -> GenerateResult:
    """Sample ``n`` continuations of each prompt.

    Args:
        model: a run directory (its ``model/final``), an ``attrctl export`` folder, or any spec
            :func:`attrctl.models.load_model` accepts (``tiny-random``, ``bundled:…``, a hub id,
            a local folder).
        prompts: one prompt or several.
        n: samples per prompt; sample ``k`` of prompt ``i`` uses ``row_seed(seed, "generate",
            i, k)``.
        max_new_tokens: tokens per sample at most (a stop token ends a sample early).
        temperature: softmax temperature (> 0).
        top_p: nucleus mass in (0, 1].
        seed: the base seed.
        guided: steer with NADO heads (``heads``, else those of ``model``, which must then be a
            run directory or an export folder).
        heads: take the heads from this run or export folder instead (implies ``guided``): e.g.
            the base model with a run's heads is the paper's *NADO decoding* baseline.
        strength: ``α`` in ``ℓ + α Σ_k w_k logσ(r_k)``.
        device: torch device for the model and heads.

    Raises:
        AttrctlError: a bad setting, a model that does not load, ``guided`` without heads.
    """
    from attrctl.models import load_model
    from attrctl.sampling import row_seed, sample_continuations

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    _check(prompts, n, max_new_tokens, temperature, top_p, strength)
    guided = guided or heads is not None
    heads_from = heads if heads is not None else (model if guided else None)
    if guided and not _has_heads(heads_from):
        raise AttrctlError(
            f"--guided needs heads: {heads_from} is not a training run or an `attrctl export` "
            "folder (pass the run directory, or --heads RUN_DIR to guide another model)"
        )
    spec = resolve_model_spec(model)
    loaded = load_model(spec, device=device)
    rows = [(i, p, k) for i, p in enumerate(prompts) for k in range(n)]
    seeds = [row_seed(seed, PROMPT_SET, i, k) for i, _, k in rows]
    proc = None
    if guided:
        from attrctl.guided import load_guidance

        proc = load_guidance(heads_from, loaded.model, strength=strength)
    try:
        tokens = sample_continuations(
            loaded.model, loaded.tokenizer, [p for _, p, _ in rows], seeds,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            logits_processor=proc,
        )  # fmt: skip
    finally:
        if proc is not None:
            proc.close()
    texts = loaded.tokenizer.batch_decode(tokens, skip_special_tokens=True)
    gens = [
        Generation(prompt=p, text=t, sample=k, seed=s, tokens=len(ids))
        for (_, p, k), t, s, ids in zip(rows, texts, seeds, tokens, strict=True)
    ]
    return GenerateResult(
        model=spec,
        guided_by=str(heads_from) if guided else None,
        strength=strength if guided else 0.0,
        generations=gens,
    )


def _has_heads(path: str | os.PathLike | None) -> bool:
    if path is None:
        return False
    p = Path(path).expanduser()
    return (p / "run.json").is_file() or (p / "heads" / "heads.safetensors").is_file()


def _check(prompts, n, max_new_tokens, temperature, top_p, strength) -> None:
    problems = []
    if not prompts:
        problems.append("no prompt given")
    if n < 1:
        problems.append(f"-n must be >= 1, got {n}")
    if max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not temperature > 0:
        problems.append(f"--temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        problems.append(f"--top-p must be in (0, 1], got {top_p}")
    if not strength >= 0:
        problems.append(f"--strength must be >= 0, got {strength}")
    if problems:
        raise AttrctlError("; ".join(problems))
