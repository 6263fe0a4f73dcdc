"""Classification ROC-AUC of a model on the held-out rows of a policy's templated sources.

A templated source (:mod:`attrctl.data.template`) holds out a test split of its rows. Each test
row's score is the log-odds of the positive label's words after the row's prefix::

    s = log p(words[positive] | prefix) − logsumexp_{l ≠ positive} log p(words[l] | prefix)

(with two labels, log p(yes) − log p(no)); ROC-AUC compares the scores of positive and negative
rows, with a 95% bootstrap interval that resamples the split's groups (prompts, say), since rows of
one group are not independent. A model never fine-tuned on the template is scored the same way:
that is its zero-shot ROC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from attrctl.data.mixture import labelled_ids
from attrctl.data.template import LabelledText
from attrctl.policy.schema import Template

BATCH = 32


@dataclass(frozen=True)
class HeldoutSet:
    """One templated source's held-out rows, ready to score."""

    source: str
    template: Template
    rows: list[LabelledText]


def heldout_sets(policy: Any) -> list[HeldoutSet]:
    """The held-out rows of every templated source of ``policy`` that has some (read, templated
    and labelled now, so a missing or malformed source fails before any sampling).

    Raises:
        AttrctlError: a templated source that cannot be read.
    """
    from attrctl.data.sources import heldout_labelled

    out = []
    for source in policy.data:
        template = getattr(source, "template", None)
        if template is None or template.test_share == 0:
            continue
        label, rows = heldout_labelled(source, policy)
        if rows:
            out.append(HeldoutSet(label, template, rows))
    return out


def classification_results(
    model: Any,
    tokenizer: Any,
    sets: Sequence[HeldoutSet],
    *,
    seq_len: int,
    seed: int,
    resamples: int,
    bar: Any = None,
) -> dict[str, dict[str, Any]] | None:
    """``{source label: result}`` for every held-out set (:func:`heldout_sets`), else None.

    A result is ``{"roc_auc": {"value", "ci": [lo, hi]}, "texts", "positives", "groups",
    "positive_label", "label_words"}``; ``value`` and ``ci`` are null when the held-out rows have
    one class only.
    """
    out = {}
    for s in sets:
        template, rows = s.template, s.rows
        scores = label_log_odds(
            model, tokenizer, [r.prefix for r in rows], template.label_words,
            template.positive_label, max_len=seq_len - 1, bar=bar,
        )  # fmt: skip
        positive = np.array([r.label == template.positive_label for r in rows])
        groups = [r.group for r in rows]
        value, ci = roc_auc_ci(scores, positive, groups, seed=seed, resamples=resamples)
        if value != value:  # NaN: one class only among the held-out rows; JSON has no NaN
            value, ci = None, [None, None]
        elif ci[0] != ci[0]:
            ci = [None, None]
        out[s.source] = {
            "roc_auc": {"value": value, "ci": ci},
            "texts": len(rows),
            "positives": int(positive.sum()),
            "groups": len(set(groups)),
            "positive_label": template.positive_label,
            "label_words": dict(template.label_words),
        }
    return out or None


@torch.no_grad()
def label_log_odds(
    model: Any,
    tokenizer: Any,
    prefixes: Sequence[str],
    label_words: dict[str, str],
    positive: str,
    *,
    max_len: int,
    bar: Any = None,
) -> np.ndarray:
    """The log-odds of ``positive``'s words after each prefix (see the module docstring), each
    text encoded as training encodes it (:func:`~attrctl.data.mixture.labelled_ids`: at most
    ``max_len`` tokens, the prefix cut from the left)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    logp: dict[str, list[float]] = {k: [] for k in label_words}
    for b in range(0, len(prefixes), BATCH):
        chunk = prefixes[b : b + BATCH]
        for k, w in label_words.items():
            seqs = [labelled_ids(tokenizer, p, w, max_len) for p in chunk]  # [(ids, n_words)]
            width = max(len(ids) for ids, _ in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)  # [B, L] right-padded
            mask = torch.zeros_like(ids)
            for r, (seq, _) in enumerate(seqs):
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for r, (seq, n) in enumerate(seqs):  # the positions that predict the words: [n, V]
                lp = torch.log_softmax(logits[r, len(seq) - n - 1 : len(seq) - 1].float(), -1)
                tgt = torch.tensor(seq[len(seq) - n :], device=device)
                logp[k].append(float(lp.gather(1, tgt[:, None]).sum()))
        if bar is not None:
            bar.update(len(chunk))
    table = {k: np.array(v) for k, v in logp.items()}
    rest = [table[k] for k in table if k != positive]
    return table[positive] - np.logaddexp.reduce(np.stack(rest), axis=0)


def roc_auc_ci(
    scores: np.ndarray,
    positive: np.ndarray,
    groups: Sequence[str],
    *,
    seed: int,
    resamples: int,
) -> tuple[float, list[float]]:
    """ROC-AUC and its 95% bootstrap interval over groups (NaN where a class is absent)."""
    from attrctl.train.fit import auc

    value = auc(scores, positive)
    names = sorted(set(groups))
    index = {g: i for i, g in enumerate(names)}
    member = np.array([index[g] for g in groups])
    rows_of = [np.flatnonzero(member == i) for i in range(len(names))]
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(resamples):
        picked = np.concatenate([rows_of[i] for i in rng.integers(0, len(names), len(names))])
        a = auc(scores[picked], positive[picked])
        if a == a:  # NaN when a resample has one class only
            boots.append(a)
    if not boots:
        return value, [float("nan"), float("nan")]
    return value, [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]
