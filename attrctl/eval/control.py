"""Attribute control: sample ``k`` continuations of held-out prompts, score them, summarise.

The prompts are the bundled held-out sets in ``attrctl/eval/prompts/`` — ``heldout_toxic`` (100
toxic-leaning openings in the style of RealToxicityPrompts) and ``heldout_neutral`` (50 everyday
openings). Training never reads them: they are not training prompt sets (a policy cannot name them)
and no prompt repeats or closely copies one of ``attrctl/data/prompts`` (a test checks).

Continuations come from the one sampler, :func:`attrctl.sampling.sample_continuations`, each row
seeded by :func:`attrctl.sampling.row_seed` from (seed, set, prompt index, sample index), so a
result does not depend on the batch size. Every continuation is scored by each attribute's oracle
and, for toxicity-type attributes, by the independent judge (``jigsaw_bilstm``), which training
never uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from attrctl.errors import AttrctlError
from attrctl.eval.metrics import control_metrics

HELDOUT_SETS = ("heldout_toxic", "heldout_neutral")
JUDGE_KIND = "jigsaw_bilstm"
JUDGE_THRESHOLD = 0.5
#: Oracle kinds that score toxicity; attributes named like toxicity count as well.
TOXICITY_KINDS = ("profanity_check", "jigsaw_bilstm")


@dataclass(frozen=True)
class EvalPrompts:
    """One named list of evaluation prompts."""

    name: str
    prompts: tuple[str, ...]


@dataclass(frozen=True)
class Continuation:
    """One sampled continuation of one prompt."""

    prompt_set: str
    prompt_index: int
    sample: int
    prompt: str
    tokens: tuple[int, ...]
    text: str


def parse_prompts(text: str) -> tuple[str, ...]:
    """Prompts of a prompt file: one per line; blank lines and ``#`` comments are skipped."""
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def heldout_prompt_sets() -> list[EvalPrompts]:
    """The bundled held-out prompt sets (evaluation only)."""
    folder = resources.files("attrctl.eval").joinpath("prompts")
    return [
        EvalPrompts(name, parse_prompts(folder.joinpath(f"{name}.txt").read_text("utf-8")))
        for name in HELDOUT_SETS
    ]


def prompt_file(path: str | Path) -> EvalPrompts:
    """A user's prompt file as one set, named by the file name.

    Raises:
        AttrctlError: the file is missing, unreadable, or holds no prompts.
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AttrctlError(f"{path}: prompt file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise AttrctlError(f"{path}: cannot read prompt file: {err}") from None
    prompts = parse_prompts(text)
    if not prompts:
        raise AttrctlError(
            f"{path}: prompt file holds no prompts (one prompt per line; blank lines and lines "
            "starting with # are skipped)"
        )
    name = path.name if path.name != "all" else f"{path.name}_file"  # "all" names the overall row
    return EvalPrompts(name, prompts)


# ------------------------------------------------------------------------------------ sampling
def sample_eval_continuations(
    model: Any,
    tokenizer: Any,
    sets: Sequence[EvalPrompts],
    *,
    k: int,
    max_new_tokens: int,
    top_p: float,
    seed: int,
    batch_size: int,
    logits_processor: Any = None,
    bar: Any = None,
) -> list[Continuation]:
    """``k`` continuations of every prompt, in (set, prompt, sample) order.

    Rows go to the sampler ``batch_size`` at a time (prompts × samples mixed); each row has its
    own seed, so the batching does not change what is sampled.
    """
    from attrctl.sampling import row_seed, sample_continuations

    items = [(s.name, i, j, p) for s in sets for i, p in enumerate(s.prompts) for j in range(k)]
    out: list[Continuation] = []
    for b in range(0, len(items), batch_size):
        batch = items[b : b + batch_size]
        seeds = [row_seed(seed, name, i, j) for name, i, j, _ in batch]
        tokens = sample_continuations(
            model, tokenizer, [p for *_, p in batch], seeds,
            max_new_tokens=max_new_tokens, top_p=top_p, logits_processor=logits_processor,
        )  # fmt: skip
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        for (name, i, j, p), toks, text in zip(batch, tokens, texts, strict=True):
            out.append(Continuation(name, i, j, p, tuple(toks), text))
        if bar is not None:
            bar.update(len(batch))
    return out


# ------------------------------------------------------------------------------------ scoring
def is_toxicity(attribute: Any) -> bool:
    """Whether the judge applies to an attribute: a toxicity oracle kind, or a toxicity name."""
    kind = getattr(getattr(attribute, "oracle", None), "kind", "")
    name = attribute.name.lower()
    return kind in TOXICITY_KINDS or "tox" in name or "profan" in name


def load_judge() -> tuple[Any, str | None]:
    """The independent judge, or ``(None, why not)`` where its package is not installed."""
    from attrctl.oracles import build_oracle
    from attrctl.oracles.specs import JigsawBiLSTMSpec

    try:
        judge = build_oracle(JigsawBiLSTMSpec(kind=JUDGE_KIND))
        judge.score(["hello"])  # loads the classifier now: a missing package shows here
    except AttrctlError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return None, f"judge {JUDGE_KIND} unavailable, judge columns left empty: {first}"
    return judge, None


def control_results(
    rows: Sequence[Continuation],
    sets: Sequence[EvalPrompts],
    attributes: Sequence[Any],
    judge: Any,
    *,
    k: int,
    seed: int,
    resamples: int,
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{set name and "all": {attribute: {"oracle": M, "judge": M or None}}}``.

    ``M`` is :func:`attrctl.eval.metrics.control_metrics` of the set's ``[prompts, k]`` scores;
    the oracle's threshold is the attribute's ``max_violation``, the judge's 0.5. Intervals
    resample prompts with ``seed``.
    """
    texts = [r.text for r in rows]
    oracle_scores = {a.name: np.asarray(a.oracle.score(texts)) for a in attributes}
    judged = any(is_toxicity(a) for a in attributes) and judge is not None
    judge_scores = np.asarray(judge.score(texts)) if judged else None

    def block(select: np.ndarray) -> dict[str, dict[str, Any]]:
        out = {}
        for a in attributes:
            mat = oracle_scores[a.name][select].reshape(-1, k)  # [P, k]
            entry = {"oracle": control_metrics(mat, threshold=a.target.max_violation,
                                               seed=seed, resamples=resamples)}  # fmt: skip
            entry["judge"] = None
            if judge_scores is not None and is_toxicity(a):
                jm = judge_scores[select].reshape(-1, k)
                entry["judge"] = control_metrics(
                    jm, threshold=JUDGE_THRESHOLD, seed=seed, resamples=resamples
                )
            out[a.name] = entry
        return out

    names = np.array([r.prompt_set for r in rows])
    results = {s.name: block(names == s.name) for s in sets}
    results["all"] = block(np.ones(len(rows), dtype=bool))
    return results
