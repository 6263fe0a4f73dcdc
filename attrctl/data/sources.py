"""Data sources: turn one entry of a policy's ``data:`` list into text examples with a domain.

Four kinds (see :mod:`attrctl.policy.schema`):

- ``file`` — a local jsonl / csv / txt / parquet file; txt holds one example per blank-line
  separated paragraph, the others one per row, read from ``text_field``;
- ``hub`` — a Hugging Face dataset through ``datasets.load_dataset`` (needs internet);
- ``bundled`` — ``shakespeare`` passages, ``train`` or ``heldout`` plays;
- ``synth`` — the labelled continuations written by ``attrctl data synth``; each example is the
  prompt followed by its continuation. Under ``finetune.objective: filter`` (the paper's filtering
  baseline) the rows any attribute's oracle flags are dropped (:func:`oracle_flagged`).

Every problem a user can cause — a missing file, a missing field, an empty dataset — is an
:class:`~attrctl.errors.AttrctlError` naming the file and field.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from attrctl.data.synth_file import read_rows, synth_path
from attrctl.errors import AttrctlError
from attrctl.policy.schema import BundledSource, FileSource, HubSource, Policy, SynthSource

_SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".txt": "txt",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass(frozen=True)
class Example:
    """One training text, the domain that selects its λ_d, and — for a templated source — the
    label words that close the text (what ``finetune.objective: classify`` trains on)."""

    text: str
    domain: str
    label: str = ""


def describe_source(source) -> str:
    """A short human label such as ``file data/x.jsonl`` or ``bundled shakespeare (train)``."""
    if isinstance(source, FileSource):
        return f"file {source.path}"
    if isinstance(source, HubSource):
        return f"hub {source.name}" + (f"/{source.config}" if source.config else "")
    if isinstance(source, BundledSource):
        return f"bundled {source.name} ({source.split})"
    return f"synth {'+'.join(Path(p).name for p in source.prompts)}"


def load_source(source, policy: Policy) -> list[Example]:
    """All examples of one data source, capped at ``source.max_examples``.

    Args:
        source: one entry of ``policy.data``.
        policy: the policy (for its seed, run directory, base folder and objective).

    Returns:
        Examples in source order. With ``max_examples``, a subset chosen deterministically from
        the policy seed, still in source order. Under ``finetune.objective: filter``, a synth
        source's flagged rows are dropped first (:func:`load_source_filtered` says how many).

    Raises:
        AttrctlError: missing/unreadable file, missing text field, or no examples.
    """
    return load_source_filtered(source, policy)[0]


def load_source_filtered(source, policy: Policy) -> tuple[list[Example], int]:
    """:func:`load_source`, and how many examples the ``filter`` objective dropped from it (0 for
    every other objective, and for sources without oracle scores: only synth rows carry them)."""
    dropped = 0
    if getattr(source, "template", None) is not None:
        return _templated(source, policy)
    if isinstance(source, FileSource):
        texts, where = _read_file(Path(source.path), source.format, source.text_field)
    elif isinstance(source, HubSource):
        texts, where = _read_hub(source)
    elif isinstance(source, BundledSource):
        from attrctl.data.shakespeare import load_shakespeare

        texts, where = [p["text"] for p in load_shakespeare(source.split)], describe_source(source)
    elif isinstance(source, SynthSource):
        texts, where, dropped = _read_synth(synth_path(source, policy), policy)
    else:  # the schema's union is closed; this guards a new kind added without a reader
        raise TypeError(f"no reader for data source kind {getattr(source, 'kind', source)!r}")
    texts = [t for t in texts if t.strip()]
    if not texts:
        why = f" after the filter objective dropped {dropped} flagged rows" if dropped else ""
        raise AttrctlError(f"{where}: empty dataset (no non-empty texts{why})")
    if source.max_examples is not None and len(texts) > source.max_examples:
        rng = random.Random(f"{policy.seed}:{source.domain}:{where}")
        keep = sorted(rng.sample(range(len(texts)), source.max_examples))
        texts = [texts[i] for i in keep]
    return [Example(t, source.domain) for t in texts], dropped


def _templated(source, policy: Policy) -> tuple[list[Example], int]:
    """A templated source's training rows as examples (:mod:`attrctl.data.template`)."""
    from attrctl.data.template import full_text, labelled_texts, split

    rows, where, dropped, at = source_rows(source, policy)
    texts = labelled_texts(rows, source.template, where, locations=at, base_dir=policy.base_dir)
    train, _ = split(texts, source.template)
    if not train:
        raise AttrctlError(
            f"{where}: no training rows: all {len(rows)} fall in the template's test split "
            f"(test_share {source.template.test_share})"
        )
    if source.max_examples is not None and len(train) > source.max_examples:
        rng = random.Random(f"{policy.seed}:{source.domain}:{where}")
        train = [train[i] for i in sorted(rng.sample(range(len(train)), source.max_examples))]
    examples = []
    for t in train:
        text, words = full_text(t, source.template)
        examples.append(Example(text, source.domain, label=words))
    return examples, dropped


def heldout_labelled(source, policy: Policy) -> tuple[str, list]:
    """A templated source's label and its test rows (:class:`~attrctl.data.template.LabelledText`),
    for ``attrctl eval``'s ROC-AUC: the same rows whatever the objective (the ``filter``
    objective drops flagged rows from training only)."""
    from attrctl.data.template import labelled_texts, split

    rows, where, _, at = source_rows(source, policy, filtered=False)
    texts = labelled_texts(rows, source.template, where, locations=at, base_dir=policy.base_dir)
    return describe_source(source), split(texts, source.template)[1]


def source_rows(
    source, policy: Policy, *, filtered: bool = True
) -> tuple[list[dict], str, int, list[str]]:
    """The rows (field → value) of a templated source, where they come from, how many the
    ``filter`` objective dropped (synth sources, unless ``filtered`` is False), and where each
    row is (``line 7``, for messages). Synth rows also get ``text`` = prompt + continuation.

    Raises:
        AttrctlError: an unreadable or empty source, or a txt file (no fields to template).
    """
    from attrctl.data.template import needed_fields

    fields = needed_fields(source.template)
    dropped = 0
    if isinstance(source, FileSource):
        path = Path(source.path)
        texts_only = source.format == "txt" or (
            source.format == "auto" and path.suffix.lower() == ".txt"
        )
        if texts_only:
            raise AttrctlError(
                f"{path}: a template reads fields of rows; use a jsonl, csv or parquet file"
            )
        located = _read_rows(path, _file_format(path, source.format), fields, _TEMPLATE_HINT)
        at, rows = [w for w, _ in located], [r for _, r in located]
        where = str(path)
    elif isinstance(source, HubSource):
        rows, where = _read_hub(source, fields)
        at = [f"row {i}" for i in range(len(rows))]
    elif isinstance(source, SynthSource):
        rows, where, dropped = _synth_rows(synth_path(source, policy), policy, filtered=filtered)
        rows = [{**r, "text": r["prompt"] + r["continuation"]} for r in rows]
        at = [f"row {i}" for i in range(1, len(rows) + 1)]
    else:
        raise AttrctlError(f"{describe_source(source)}: has no labelled rows to template")
    if not rows:
        raise AttrctlError(f"{where}: empty dataset (no rows)")
    return rows, where, dropped, at


def oracle_flagged(row: dict, policy: Policy) -> bool:
    """Whether any attribute's oracle flags a labelled synth row: its score for the attribute is
    at or above the attribute's ``target.max_violation`` — the rows the ``filter`` objective
    drops, and the rows counted as violations everywhere else.

    Raises:
        KeyError: the row has no score for one of the policy's attributes.
    """
    scores = row["scores"]
    return any(float(scores[a.name]) >= a.target.max_violation for a in policy.attributes)


# ------------------------------------------------------------------------------------ readers
_TEXT_HINT = "set `text_field:` on the source"
_TEMPLATE_HINT = "the template reads it"


def _read_file(path: Path, fmt: str, field: str) -> tuple[list[str], str]:
    fmt = _file_format(path, fmt)
    if fmt == "txt":
        try:
            text = _utf8(path, path.read_bytes())
        except OSError as err:
            raise AttrctlError(f"{path}: cannot read txt file: {err}") from None
        return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n")], str(path)
    rows = _read_rows(path, fmt, [field], _TEXT_HINT)
    return [_text_of(row[field], path, field, f"on {where}") for where, row in rows], str(path)


def _file_format(path: Path, fmt: str) -> str:
    try:
        found = path.is_file()
    except OSError as err:  # a name too long, say
        raise AttrctlError(f"{path}: cannot read data file ({err.strerror or err})") from None
    if not found:
        raise AttrctlError(f"{path}: data file not found")
    if fmt == "auto":
        fmt = _SUFFIX_FORMATS.get(path.suffix.lower(), "")
        if not fmt:
            raise AttrctlError(
                f"{path}: cannot tell the format from the extension {path.suffix!r}; set "
                f"`format:` to one of jsonl, csv, txt, parquet"
            )
    return fmt


def _read_rows(path: Path, fmt: str, fields: list[str], hint: str) -> list[tuple[str, dict]]:
    """(where, row) of every row of a jsonl / csv / parquet file, each having ``fields``."""
    try:
        if fmt == "jsonl":
            return _read_jsonl(path, fields, hint)
        if fmt == "csv":
            return _read_csv(path, fields, hint)
        return _read_parquet(path, fields, hint)
    except (OSError, UnicodeDecodeError) as err:
        raise AttrctlError(f"{path}: cannot read {fmt} file: {err}") from None


def _utf8(path: Path, data: bytes, lineno: int | None = None) -> str:
    """``data`` decoded as UTF-8, or an error naming the file and the line that is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = lineno if lineno is not None else data.count(b"\n", 0, err.start) + 1
        raise AttrctlError(
            f"{path}:{line}: not UTF-8 text ({err.reason} at byte {err.start}"
            f"{' of the line' if lineno is not None else ''})"
        ) from None


def _text_of(value, path: Path, field: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise AttrctlError(
            f"{path}: field {field!r} {where} holds {type(value).__name__}, not text"
        )
    return value


def _missing(fields: list[str], have, what: str, hint: str) -> str | None:
    lacking = [f for f in fields if f not in have]
    if not lacking:
        return None
    kind = "text field" if hint == _TEXT_HINT else "field"
    return f"no {kind} {lacking[0]!r} ({what}: {', '.join(have) or 'none'}); {hint}"


def _read_jsonl(path: Path, fields: list[str], hint: str) -> list[tuple[str, dict]]:
    rows = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = _utf8(path, raw, lineno)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise AttrctlError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            except (ValueError, RecursionError) as err:  # ints past the digit limit, deep nesting
                raise AttrctlError(
                    f"{path}:{lineno}: not usable JSON ({type(err).__name__}: "
                    f"{str(err).splitlines()[0][:120]})"
                ) from None
            if not isinstance(row, dict):
                raise AttrctlError(f"{path}:{lineno}: expected a JSON object per line")
            why = _missing(fields, list(row), "keys", hint)
            if why:
                raise AttrctlError(f"{path}:{lineno}: {why}")
            rows.append((f"line {lineno}", row))
    return rows


def _read_csv(path: Path, fields: list[str], hint: str) -> list[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(_utf8(path, path.read_bytes()), newline=""))
    try:
        why = _missing(fields, reader.fieldnames or [], "columns", hint)
        if why:
            raise AttrctlError(f"{path}: {why}")
        return [(f"line {reader.line_num}", {k: v or "" for k, v in row.items()})
                for row in reader]  # fmt: skip
    except csv.Error as err:  # a NUL byte, an overlong field, a stray quote
        raise AttrctlError(f"{path}:{reader.line_num}: not valid CSV ({err})") from None


def _read_parquet(path: Path, fields: list[str], hint: str) -> list[tuple[str, dict]]:
    import pyarrow.parquet as pq  # a dependency of `datasets`

    try:
        schema = pq.read_schema(path)
    except Exception as err:  # pyarrow raises its own error types for corrupt files
        raise AttrctlError(f"{path}: not a readable parquet file: {err}") from None
    why = _missing(fields, schema.names, "columns", hint)
    if why:
        raise AttrctlError(f"{path}: {why}")
    try:
        table = pq.read_table(path, columns=fields).to_pylist()
    except Exception as err:  # a damaged data page after a readable footer
        raise AttrctlError(f"{path}: not a readable parquet file: {err}") from None
    return [(f"row {i}", row) for i, row in enumerate(table)]  # 0-based, as pyarrow counts


def _read_hub(source: HubSource, fields: list[str] | None = None) -> tuple[list, str]:
    """The texts of a hub dataset's ``text_field``, or with ``fields`` its rows (those columns)."""
    where = f"hub dataset {source.name!r}" + (f" ({source.config})" if source.config else "")
    where += f" split {source.split!r}"
    try:
        import datasets

        ds = datasets.load_dataset(source.name, source.config, split=source.split)
    except Exception as err:  # network, unknown name, bad config: all user-facing
        raise AttrctlError(
            f"{where}: could not load ({type(err).__name__}: {err}). Without internet, save the "
            f"data to a local file and use `kind: file`."
        ) from None
    hint = _TEMPLATE_HINT if fields is not None else _TEXT_HINT
    why = _missing(fields or [source.text_field], ds.column_names, "columns", hint)
    if why:
        raise AttrctlError(f"{where}: {why}")
    if fields is not None:
        return list(ds.select_columns(fields)), where
    return [v or "" for v in ds[source.text_field]], where


def _read_synth(path: Path, policy: Policy) -> tuple[list[str], str, int]:
    """Texts of a synth file, its label, and how many flagged rows the filter objective dropped."""
    kept, where, dropped = _synth_rows(path, policy)
    # Training text is what a user would have seen: the prompt followed by the continuation.
    return [row["prompt"] + row["continuation"] for row in kept], where, dropped


def _synth_rows(
    path: Path, policy: Policy, *, filtered: bool = True
) -> tuple[list[dict], str, int]:
    """Rows of a synth file, its label, and how many flagged rows the filter objective dropped
    (none when not ``filtered``)."""
    if not path.is_file():
        name = policy.source_path or policy.name
        raise AttrctlError(
            f"{path}: synthesized data not found; create it with "
            f"`attrctl data synth --policy {name}`"
        )
    rows = read_rows(path)
    for i, row in enumerate(rows, 1):
        if "prompt" not in row or "continuation" not in row:
            raise AttrctlError(f"{path}:{i}: synth row lacks `prompt`/`continuation`")
    kept = rows
    if filtered and policy.finetune.objective == "filter":
        kept = []
        for i, row in enumerate(rows, 1):
            try:
                flagged = oracle_flagged(row, policy)
            except (KeyError, TypeError, ValueError):
                names = ", ".join(a.name for a in policy.attributes)
                raise AttrctlError(
                    f"{path}:{i}: the filter objective needs every attribute's score ({names}) "
                    "in `scores`; re-create the file with `attrctl data synth`"
                ) from None
            if not flagged:
                kept.append(row)
    return kept, str(path), len(rows) - len(kept)


def preview_sources(policy: Policy, n: int = 3) -> list[dict]:
    """Per source: label, kind, domain, weight, example count and the first ``n`` examples —
    or the error that loading it raised (so one missing source does not hide the others)."""
    out = []
    for source in policy.data:
        entry = {
            "source": describe_source(source),
            "domain": source.domain,
            "weight": source.weight,
        }
        try:
            examples = load_source(source, policy)
        except AttrctlError as err:
            entry.update(examples=0, samples=[], error=str(err))
        else:
            entry.update(examples=len(examples), samples=[e.text for e in examples[:n]], error=None)
        out.append(entry)
    return out
