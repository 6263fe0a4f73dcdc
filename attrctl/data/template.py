"""Classification text from labelled rows: a data source's ``template`` (classification
fine-tuning, the paper's Jigsaw experiment).

A row becomes ``format`` with its fields filled in, followed by the words of its label::

    format: "Comment: {text}\\nToxic:{label}"     label_words: {0: " no", 1: " yes"}
    {"text": "you idiot", "label": 1}   →   "Comment: you idiot\\nToxic: yes"
                                              └──────── prefix ───────┘└label┘

The label's words are the tail of the text, so the collator can mark their tokens
(:class:`~attrctl.data.mixture.PackingCollator`): ``finetune.objective: classify`` trains on them
alone, every other objective on the whole text. Labels come from a row field, or from an oracle's
score of one (``label_oracle``: how attrctl builds a labelled set with no labelled corpus
installed — the judge labels synthesized continuations).

**The split.** Rows are grouped by ``split_by`` (without it, each row is its own group, named by
its content), and a group is held out when a hash of its value falls under ``test_share`` (so
about that share of the groups, not exactly). The hash depends on nothing else — not
the seed, not the policy — so every policy that templates the same rows trains on the same rows
and is scored (``attrctl eval``'s ROC-AUC, :mod:`attrctl.eval.classify`) on the same held-out
ones, and no held-out text shares a group (a prompt, say) with a training text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attrctl.errors import AttrctlError
from attrctl.policy.schema import Template, label_key, template_fields

LABEL = "label"


@dataclass(frozen=True)
class LabelledText:
    """One templated row: the text before the label words, the label and the split group."""

    prefix: str
    label: str
    group: str


def needed_fields(template: Template) -> list[str]:
    """The row fields a template reads: the format's fields, the label's and the split's."""
    names = [n for n in template_fields(template.format) if n != LABEL]
    names.append(template.label_text if template.label_oracle is not None else template.label_field)
    if template.split_by is not None:
        names.append(template.split_by)
    return list(dict.fromkeys(names))


def labelled_texts(
    rows: Sequence[dict[str, Any]],
    template: Template,
    where: str,
    *,
    locations: Sequence[str] | None = None,
    base_dir: Path | None = None,
) -> list[LabelledText]:
    """Every row templated and labelled (both sides of the split).

    Args:
        rows: the source's rows (dicts of field → value).
        template: the source's ``template``.
        where: the source, for messages (a file path, a hub dataset).
        locations: per row, where it is in the source (``line 7``), for messages; default
            ``row <n>``.
        base_dir: what a ``label_oracle``'s relative paths resolve against (the policy's folder).

    Raises:
        AttrctlError: a row lacks a field the template reads, holds a value that is not text or
            a number there, or has a label that ``label_words`` has no words for.
    """
    at = list(locations) if locations is not None else [f"row {i}" for i in range(1, len(rows) + 1)]
    for name in needed_fields(template):
        for i, row in enumerate(rows):
            if name not in row:
                raise AttrctlError(
                    f"{where}: {at[i]} has no field {name!r} that the template reads "
                    f"(fields: {', '.join(row) or 'none'})"
                )
            if not isinstance(row[name], (str, int, float)) and row[name] is not None:
                raise AttrctlError(
                    f"{where}: {at[i]}: field {name!r} holds {type(row[name]).__name__}, not text "
                    "or a number"
                )
    if template.label_oracle is not None:
        labels = _oracle_labels(rows, template, base_dir)
    else:
        labels = [_row_label(row, template, f"{where}: {at[i]}") for i, row in enumerate(rows)]
    head = template.format[: -len("{" + LABEL + "}")]
    fields = needed_fields(template)
    out = []
    for row, label in zip(rows, labels, strict=True):
        values = {k: "" if v is None else str(v) for k, v in row.items() if isinstance(k, str)}
        prefix = head.format(**values)
        if template.split_by is not None:
            group = values[template.split_by]
        else:  # the row's content, not its position: dropping a row moves no other
            group = json.dumps([values[f] for f in fields], ensure_ascii=False)
        out.append(LabelledText(prefix, label, group))
    return out


def _row_label(row: dict[str, Any], template: Template, where: str) -> str:
    value = row[template.label_field]
    try:
        key = label_key(value)
    except ValueError:
        key = None
    if key not in template.label_words:
        raise AttrctlError(
            f"{where}: label {value!r} in field {template.label_field!r} has no words in "
            f"template.label_words (keys: {', '.join(map(repr, template.label_words))})"
        )
    return key


def _oracle_labels(
    rows: Sequence[dict[str, Any]], template: Template, base_dir: Path | None
) -> list[str]:
    from attrctl.oracles import build_oracle

    oracle = build_oracle(template.label_oracle, base_dir=base_dir)
    texts = ["" if r[template.label_text] is None else str(r[template.label_text]) for r in rows]
    scores = oracle.score(texts) if texts else []
    return ["1" if float(s) >= template.label_threshold else "0" for s in scores]


def is_test(group: str, share: float) -> bool:
    """Whether a split group is held out: a hash of its value alone, under ``share``."""
    digest = hashlib.sha256(f"attrctl/template-split/{group}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < share


def split(
    texts: Sequence[LabelledText], template: Template
) -> tuple[list[LabelledText], list[LabelledText]]:
    """(train, test) rows, in source order (:func:`is_test` on each row's group)."""
    train, test = [], []
    for t in texts:
        (test if is_test(t.group, template.test_share) else train).append(t)
    return train, test


def full_text(t: LabelledText, template: Template) -> tuple[str, str]:
    """The training text of a row and its label words (the text's tail)."""
    words = template.label_words[t.label]
    return t.prefix + words, words
