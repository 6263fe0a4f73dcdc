"""Generation quality: are the continuations still fluent and varied?

- **Perplexity under the base model** — ``exp`` of the mean negative log-likelihood of the sampled
  continuation tokens given their prompts, under the *base* model (the policy's ``model`` for a
  run, the model itself for a plain model). A model that dodges violations by producing garbage
  shows up here even when its own perplexity looks fine.
- **Distinct-1/2/3** — unique word n-grams over all n-grams of all continuations
  (:func:`attrctl.eval.metrics.distinct_n`): a model that repeats itself scores low.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from attrctl.eval.control import Continuation
from attrctl.eval.metrics import distinct_n
from attrctl.eval.utility import token_logprobs
from attrctl.sampling import prompt_token_ids


def generation_perplexity(
    base_model: Any, tokenizer: Any, rows: Sequence[Continuation], bar: Any = None
) -> float | None:
    """Perplexity of the continuations' tokens under ``base_model`` (None if none was sampled).

    The prompt is tokenized as the sampler tokenized it; the continuation's ids are the sampled
    ones (the base model shares the tokenizer of the evaluated model).
    """
    kept = [r for r in rows if r.tokens]
    unique = list(dict.fromkeys(r.prompt for r in kept))
    prompts = dict(zip(unique, prompt_token_ids(tokenizer, unique), strict=True))
    seqs = [list(prompts[r.prompt]) + list(r.tokens) for r in kept]
    starts = [len(prompts[r.prompt]) for r in kept]
    scored = token_logprobs(base_model, seqs, starts, bar=bar)
    tokens = sum(n for _, n in scored)
    if not tokens:
        return None
    return math.exp(-sum(lp for lp, _ in scored) / tokens)


def spread(rows: Sequence[Continuation], limit: int) -> list[Continuation]:
    """At most ``limit`` of ``rows``, evenly spread (every ⌈n / limit⌉-th row, so each prompt's
    share stays about the same); all of them when there are no more than ``limit``."""
    if limit <= 0:
        return []
    return list(rows[:: math.ceil(len(rows) / limit)]) if len(rows) > limit else list(rows)


def distinctness(texts: Sequence[str]) -> dict[str, float]:
    """``{"1", "2", "3"}``: distinct-n of all continuations."""
    return {str(n): distinct_n(texts, n) for n in (1, 2, 3)}
