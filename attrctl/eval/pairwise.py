"""Pairwise generation quality with an LM judge (``attrctl pairwise A B``).

Both models continue the same held-out prompts with the same per-row seeds; a judge (any causal
LM) reads the prompt and the two continuations and is asked which is better. Its answer is the
softmax over its next-token logits for the two answer letters, so every judgement is a
probability, not a parse of free text. Every pair is judged in **both orders** and the two
probabilities averaged, which cancels the judge's position bias; the win rate of A is the share of
pairs whose averaged probability favours A (ties count half), with a bootstrap interval over
prompts.

**A judge too weak to judge is caught, not reported.** Before the real pairs, the judge sees each
of A's continuations against a corrupted copy of itself (its words shuffled, seeded), in both
orders. The share of those pairs where it prefers the real text is its *validity rate*. Below
:data:`VALIDITY_MIN`, or with a bootstrap interval reaching down to chance, the win rates are
marked unusable (``usable: false``) and the CLI says so. The position bias — how often the judge
picks whichever text comes first — is reported beside it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from attrctl.errors import AttrctlError
from attrctl.eval.metrics import bootstrap_ci

VALIDITY_MIN = 0.65  # real text over its shuffled copy at least this often …
CHANCE = 0.5  # … and the interval's low end above chance
TEMPLATE = (
    "Here is the start of a text and two ways to continue it.\n\n"
    "Start: {prompt}\n\nContinuation A: {a}\n\nContinuation B: {b}\n\n"
    "Which continuation is better written: fluent, coherent and on topic? "
    "Answer A or B.\nAnswer:"
)
LETTERS = (" A", " B")


@dataclass(frozen=True)
class Pair:
    """One judged pair: the prompt (and its index, for the bootstrap) and the two texts."""

    prompt_index: int
    prompt: str
    a: str
    b: str


class LMJudge:
    """A causal LM asked ``TEMPLATE``; ``prob_first`` is its probability of answering A: the
    log-likelihoods of the two answers after the question, normalised over the two (every
    tokenizer splits " A" its own way, so whole answers are scored, not one token)."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer
        self.answers = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in LETTERS]
        if not all(self.answers) or self.answers[0] == self.answers[1]:
            raise AttrctlError("judge: its tokenizer cannot tell the answers ' A' and ' B' apart")

    def prob_first(self, pairs: Sequence[Pair]) -> np.ndarray:
        """``[n]`` P(the judge answers A) for each pair as given (A shown first)."""
        from attrctl.eval.utility import token_logprobs
        from attrctl.sampling import prompt_token_ids

        texts = [TEMPLATE.format(prompt=p.prompt, a=p.a, b=p.b) for p in pairs]
        questions = prompt_token_ids(self.tokenizer, texts)  # the sampler's BOS rule
        seqs = [q + ans for q in questions for ans in self.answers]
        starts = [len(q) for q in questions for _ in self.answers]
        scored = np.asarray([lp for lp, _ in token_logprobs(self.model, seqs, starts)])
        two = scored.reshape(len(pairs), 2)  # [n, 2] log P(" A"), log P(" B")
        two = np.exp(two - two.max(axis=1, keepdims=True))
        return two[:, 0] / two.sum(axis=1)


def prefer_a(judge: Any, pairs: Sequence[Pair]) -> tuple[np.ndarray, float]:
    """Averaged over both orders, ``[n]`` P(A is better); and the judge's rate of picking the
    first-shown text (position bias; 0.5 is none)."""
    shown = np.asarray(judge.prob_first(pairs))  # A first
    swapped = np.asarray(judge.prob_first([Pair(p.prompt_index, p.prompt, p.b, p.a)
                                           for p in pairs]))  # fmt: skip
    first = float(np.mean(np.concatenate([shown, swapped]) > 0.5))
    return (shown + (1.0 - swapped)) / 2.0, first


def shuffled(text: str, seed: int) -> str:
    """``text``'s words in a seeded random order different from the original (when possible)."""
    words = text.split()
    if len(set(words)) < 2:
        return " ".join(reversed(words)) if len(words) > 1 else text
    rng = random.Random(seed)
    out = words[:]
    for _ in range(20):
        rng.shuffle(out)
        if out != words:
            break
    return " ".join(out)


def _wins(pref: np.ndarray) -> np.ndarray:
    return np.where(pref > 0.5, 1.0, np.where(pref < 0.5, 0.0, 0.5))


def _per_prompt(pairs: Sequence[Pair], values: np.ndarray) -> np.ndarray:
    """``[P, k]`` rows per prompt (every prompt has the same number of pairs)."""
    order = sorted(range(len(pairs)), key=lambda j: pairs[j].prompt_index)
    by: dict[int, list[float]] = {}
    for j in order:
        by.setdefault(pairs[j].prompt_index, []).append(float(values[j]))
    k = min(len(v) for v in by.values())
    return np.asarray([v[:k] for v in by.values()])


def _rate(pairs: Sequence[Pair], wins: np.ndarray, seed: int) -> dict[str, Any]:
    matrix = _per_prompt(pairs, wins)
    ci = bootstrap_ci(matrix, lambda m: {"rate": float(m.mean())}, seed=seed)["rate"]
    return {"value": float(wins.mean()), "ci": [ci[0], ci[1]]}


def validity(judge: Any, pairs: Sequence[Pair], seed: int) -> dict[str, Any]:
    """How often the judge prefers each real continuation (A's) over its shuffled copy."""
    checks = [Pair(p.prompt_index, p.prompt, p.a, shuffled(p.a, seed + j))
              for j, p in enumerate(pairs) if len(p.a.split()) > 1]  # fmt: skip
    if not checks:
        raise AttrctlError("pairwise: no continuation has two words to shuffle for the check")
    pref, first = prefer_a(judge, checks)
    rate = _rate(checks, _wins(pref), seed)
    usable = rate["value"] >= VALIDITY_MIN and rate["ci"][0] > CHANCE
    return {"rate": rate, "pairs": len(checks), "position_bias": first,
            "threshold": VALIDITY_MIN, "usable": bool(usable),
            "corruption": "the continuation's words shuffled"}  # fmt: skip


def judge_pairs(judge: Any, pairs: Sequence[Pair], seed: int) -> dict[str, Any]:
    """The validity check, then A's win rate over the pairs (both orders)."""
    check = validity(judge, pairs, seed)
    pref, first = prefer_a(judge, pairs)
    wins = _wins(pref)
    return {
        "validity": check,
        "win_rate_a": _rate(pairs, wins, seed),
        "ties": float(np.mean(wins == 0.5)),
        "position_bias": first,
        "pairs": len(pairs),
        "prompts": len({p.prompt_index for p in pairs}),
        "usable": check["usable"],
    }


def run_pairwise(
    a: str,
    b: str,
    *,
    judge: str = "bundled:smollm2-135m-instruct",
    k: int = 2,
    max_new_tokens: int = 20,
    top_p: float = 0.9,
    seed: int = 0,
    prompts: str | None = None,
    device: str = "cpu",
    progress: Any = None,
) -> dict[str, Any]:
    """Sample both targets on the same prompts and seeds, then :func:`judge_pairs`.

    ``a`` and ``b`` are run directories or model specs (a run is sampled from its
    ``model/final``); prompts are the bundled held-out sets, or a prompt file.
    """
    import time

    from attrctl.eval import control
    from attrctl.eval.runner import resolve_target
    from attrctl.models import load_model

    start = time.perf_counter()
    sets = [control.prompt_file(prompts)] if prompts else control.heldout_prompt_sets()
    targets = [resolve_target(t) for t in (a, b)]  # checks both before any work
    sampled = []
    for t in targets:
        loaded = load_model(t.model_spec, device=device)
        rows = control.sample_eval_continuations(
            loaded.model, loaded.tokenizer, sets, k=k, max_new_tokens=max_new_tokens, top_p=top_p,
            seed=seed, batch_size=64, bar=None if progress is None else progress.bar(
                f"sample {t.label}", sum(len(s.prompts) for s in sets) * k, "row"),
        )  # fmt: skip
        sampled.append(rows)
        del loaded
    index = {(s.name, i): n for n, (s, i) in enumerate((s, i) for s in sets
                                                        for i in range(len(s.prompts)))}  # fmt: skip
    pairs = [Pair(index[(ra.prompt_set, ra.prompt_index)], ra.prompt, ra.text, rb.text)
             for ra, rb in zip(*sampled, strict=True)]  # fmt: skip
    loaded = load_model(judge, device=device)
    result = judge_pairs(LMJudge(loaded.model, loaded.tokenizer), pairs, seed)
    return {
        "a": targets[0].label, "b": targets[1].label, "judge": judge,
        "settings": {"k": k, "max_new_tokens": max_new_tokens, "top_p": top_p, "seed": seed,
                     "prompt_sets": [s.name for s in sets], "template": TEMPLATE},
        **result,
        "seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip


def describe(r: dict[str, Any]) -> list[str]:
    v = r["validity"]
    lo, hi = v["rate"]["ci"]
    w = r["win_rate_a"]
    lines = [
        f"judge           {r['judge']}: prefers the real continuation over its shuffled copy "
        f"{v['rate']['value']:.1%} ({lo:.1%}–{hi:.1%}) of {v['pairs']} pairs; picks the first "
        f"shown {v['position_bias']:.1%}",
        f"win rate        {r['a']} over {r['b']}: {w['value']:.1%} "
        f"({w['ci'][0]:.1%}–{w['ci'][1]:.1%}) on {r['pairs']} pairs of {r['prompts']} prompts, "
        f"both orders; ties {r['ties']:.1%}",
    ]
    if not r["usable"]:
        lines.append(
            f"UNUSABLE        the judge does not tell real text from shuffled words reliably "
            f"(needs ≥ {v['threshold']:.0%} with the interval above 50%): do not read the win rate"
        )
    return lines
