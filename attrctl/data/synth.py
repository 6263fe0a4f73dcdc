"""Toxic-domain data by sampling: continuations of prompt sets, labelled by the policy's oracles.

No toxic corpus ships in a registry package, so — as the paper builds its NADO data — we sample
continuations of hand-written toxic-leaning and neutral prompts from the base model and score each
continuation with every attribute's oracle. Each continuation is one jsonl row; the row format,
the settings fingerprint and the reader live in :mod:`attrctl.data.synth_file`.

**Determinism and resumption.** Each row samples from its own ``torch.Generator`` seeded from
(policy seed, prompt set, prompt index, sample index), so a row does not depend on which other
rows were sampled before it. The work list is cut into fixed batches; rows are appended and
fsynced batch by batch. A rerun reads the file, drops a partially written last line, and
regenerates every batch that is not complete — the whole batch, so the rows it keeps come from the
same batch composition and match an uninterrupted run bit for bit — appending only missing rows.
It first checks every row against the current settings: a row with another fingerprint, or whose
prompt is not the current text of its (prompt set, index), or written before fingerprints were
recorded, refuses the run — appending would mix rows of two settings in one file. A malformed
row (not JSON, a field missing or of the wrong type, a row repeated) is refused too, naming its
line.

**Faults and concurrency.** A batch is appended whole or not at all: a full disk or SIGINT halfway
through it cuts the file back to the batch before (:func:`attrctl.paths.append_durably`). One
process writes a file at a time: ``<file>.lock`` holds the writer's pid (``flock``-ed, so a
killed writer's lock is taken over), and a second ``synth`` into the same file refuses, naming it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attrctl.data.prompt_sets import PromptSet, load_prompt_set

# the synth file's format, fingerprint and reader; these names stay importable from here
from attrctl.data.synth_file import ROW_FIELDS as ROW_FIELDS
from attrctl.data.synth_file import TEXT_FIELDS as TEXT_FIELDS
from attrctl.data.synth_file import (
    check_compatible,
    drop_partial_line,
    is_number,
    numbered_rows,
    row_settings,
    settings_stamp,
    synth_path,
)
from attrctl.data.synth_file import read_rows as read_rows
from attrctl.errors import AttrctlError
from attrctl.paths import PidLock, append_durably, writing
from attrctl.policy.schema import Policy, SynthSource
from attrctl.sampling import row_seed, sample_continuations


@dataclass(frozen=True)
class WorkItem:
    """One continuation to sample: a prompt of a set and a sample index."""

    prompt_set: str
    prompt_index: int
    sample: int
    prompt: str

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.prompt_set, self.prompt_index, self.sample)


@dataclass
class SynthReport:
    """What one :func:`synthesize` call did, and what the file now holds.

    Attributes:
        path: the jsonl file.
        rows_total: rows the file holds for this work list.
        rows_written: rows appended by this call.
        seconds: wall time spent sampling and labelling (model loading excluded).
        new_tokens: continuation tokens sampled by this call (eos and later excluded).
        dropped_partial_line: whether a partially written last line was dropped.
        per_set: prompt set → number of rows and fraction scoring above the first attribute's
            ``max_violation``.
        complete: whether every item of the work list is in the file.
    """

    path: Path
    rows_total: int = 0
    rows_written: int = 0
    seconds: float = 0.0
    new_tokens: int = 0
    dropped_partial_line: bool = False
    per_set: dict[str, dict[str, float]] = field(default_factory=dict)
    complete: bool = False

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


# -------------------------------------------------------------------------------- the driver
def synth_source_of(policy: Policy) -> SynthSource:
    """The policy's first ``kind: synth`` data source, else one with the schema's defaults."""
    for source in policy.data:
        if isinstance(source, SynthSource):
            return source
    return SynthSource(domain="toxic")


def work_items(source: SynthSource, limit: int | None = None) -> list[WorkItem]:
    """Every (prompt set, prompt, sample) to sample, in file order; ``limit`` prompts per set."""
    return _items([load_prompt_set(ref) for ref in source.prompts], source, limit)


def _items(sets: list[PromptSet], source: SynthSource, limit: int | None) -> list[WorkItem]:
    items = []
    for pset in sets:
        for p_idx, prompt in enumerate(pset.prompts[:limit]):
            items.extend(
                WorkItem(pset.name, p_idx, s, prompt) for s in range(source.samples_per_prompt)
            )
    return items


def synthesize(
    policy: Policy,
    out: str | os.PathLike | None = None,
    *,
    source: SynthSource | None = None,
    model: Any = None,
    limit: int | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> SynthReport:
    """Sample and label continuations of the synth source's prompt sets; append them to ``out``.

    Args:
        policy: the policy: its base model, seed and attributes' oracles are used.
        out: the jsonl file (default: the synth source's path, else
            ``<run_dir>/data/synth.jsonl``). Rows already in it are kept and skipped.
        source: the synth settings (default: the policy's first synth source).
        model: a ``LoadedModel`` or a model spec overriding ``policy.model`` (None: the policy's).
        limit: sample only the first ``limit`` prompts of each set.
        stop_after: stop after this many sampled batches (used to test resumption).
        progress: show a tqdm bar with tokens/s on stderr.

    Returns:
        A :class:`SynthReport`.

    Raises:
        AttrctlError: the file holds rows made with other settings (model, seed, generation
            settings, domain, an attribute's oracle or target, or a prompt's text), or rows
            without a fingerprint, or is corrupt. The message names the line and what differs.
    """
    from tqdm.auto import tqdm

    from attrctl.policy.compile import compile_policy

    source = source or synth_source_of(policy)
    out = Path(out) if out is not None else synth_path(source, policy)
    if limit is not None and limit < 1:
        raise AttrctlError(f"--limit must be at least 1, got {limit}")
    sets = [load_prompt_set(ref) for ref in source.prompts]
    items = _items(sets, source, limit)
    report = SynthReport(path=out)

    model_spec = model if isinstance(model, str) else getattr(model, "spec", None) or policy.model
    stamp = settings_stamp(row_settings(policy, source, model_spec))
    prompts = {ps.name: ps.prompts for ps in sets}
    numbered, partial = _read_existing(out, stamp, prompts)
    todo = _todo(numbered, items, source)
    lock = None
    if todo:
        # One writer per file: take its lock, then read it again as it is now that nobody else
        # can append (another process may have finished it meanwhile).
        lock = PidLock(out.with_name(out.name + ".lock"), what=str(out)).acquire()
    try:
        if lock is not None:
            numbered, partial = _read_existing(out, stamp, prompts)
            todo = _todo(numbered, items, source)
        existing = [row for _, row in numbered]
        done = {_key(r) for r in existing}
        wanted = {it.key for it in items}
        rows = [r for r in existing if _key(r) in wanted]
        if todo:
            compiled = compile_policy(policy)
            loaded = _load(model if model is not None else policy.model)
            bar = tqdm(
                total=len(items),
                initial=len(items) - sum(it.key not in done for b in todo for it in b),
                unit="row",
                desc=f"synth {out.name}",
                file=sys.stderr,
                disable=not progress,
                dynamic_ncols=True,
            )
            start = time.perf_counter()
            with writing(out):
                out.parent.mkdir(parents=True, exist_ok=True)
            fh = None
            try:
                with bar:
                    for n_batch, batch in enumerate(todo):
                        if stop_after is not None and n_batch >= stop_after:
                            break
                        new = _run_batch(batch, done, loaded, compiled, policy, source, stamp)
                        if fh is None:  # the first append: cut a line a kill left half written
                            if partial:
                                drop_partial_line(out)
                                report.dropped_partial_line = True
                            with writing(out):
                                fh = out.open("ab", buffering=0)
                        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new)
                        # whole batches only: a full disk or SIGINT mid-batch leaves the file as
                        # it was before the batch, and a rerun continues from there
                        append_durably(fh, out, data.encode("utf-8"))
                        rows.extend(new)
                        report.rows_written += len(new)
                        report.new_tokens += sum(r["new_tokens"] for r in new)
                        report.seconds = time.perf_counter() - start
                        bar.update(len(new))
                        bar.set_postfix_str(f"{report.tokens_per_s:.0f} tok/s")
            finally:
                if fh is not None:
                    fh.close()
    finally:
        if lock is not None:
            lock.release()
    report.rows_total = len(rows)
    report.complete = {_key(r) for r in rows} >= wanted
    report.per_set = _stats(rows, policy)
    return report


def _key(row: dict[str, Any]) -> tuple[str, int, int]:
    return (row["prompt_set"], row["prompt_index"], row["sample"])


def _read_existing(
    out: Path, stamp: dict[str, Any], prompts: dict[str, tuple[str, ...]]
) -> tuple[list[tuple[int, dict[str, Any]]], bool]:
    """The rows already in ``out`` (none if it does not exist), checked: each a well-formed row
    made under ``stamp`` from the current text of its prompt, none repeated. Also whether a
    partial last line follows them."""
    try:
        if not out.exists():
            return [], False
    except OSError as err:
        raise AttrctlError(f"{out}: cannot read ({err.strerror or err})") from None
    numbered, partial = numbered_rows(out)
    seen: dict[tuple, int] = {}
    for lineno, row in numbered:
        if not is_number(row.get("score")):
            raise AttrctlError(f"{out}:{lineno}: corrupt row (`score` is not a finite number)")
        first = seen.setdefault(_key(row), lineno)
        if first != lineno:
            raise AttrctlError(
                f"{out}:{lineno}: the row repeats line {first} (prompt set "
                f"{Path(row['prompt_set']).name!r}, prompt {row['prompt_index']}, sample "
                f"{row['sample']}); delete one of them"
            )
    # every row, not only the wanted ones: the file is one data set, whatever --limit says
    check_compatible(out, numbered, stamp, prompts)
    return numbered, partial


def _todo(
    numbered: list[tuple[int, dict[str, Any]]], items: list[WorkItem], source: SynthSource
) -> list[list[WorkItem]]:
    """The batches of the work list that are not complete in the file."""
    done = {_key(row) for _, row in numbered}
    batches = [items[i : i + source.batch_size] for i in range(0, len(items), source.batch_size)]
    return [b for b in batches if any(it.key not in done for it in b)]


def _load(model: Any):
    if not isinstance(model, str):
        return model
    from attrctl.models import load_model

    return load_model(model)


def _run_batch(
    batch: list[WorkItem],
    done: set,
    loaded: Any,
    compiled: Any,
    policy: Policy,
    source: SynthSource,
    stamp: dict[str, Any],
) -> list[dict[str, Any]]:
    seeds = [row_seed(policy.seed, it.prompt_set, it.prompt_index, it.sample) for it in batch]
    token_lists = sample_continuations(
        loaded.model,
        loaded.tokenizer,
        [it.prompt for it in batch],
        seeds,
        max_new_tokens=source.max_new_tokens,
        temperature=source.temperature,
        top_p=source.top_p,
    )
    texts = loaded.tokenizer.batch_decode(token_lists, skip_special_tokens=True)
    scores = {a.name: a.oracle.score(texts) for a in compiled.attributes}
    first = compiled.attributes[0].name
    rows = []
    for i, it in enumerate(batch):
        if it.key in done:  # regenerated only to keep the batch composition; already on disk
            continue
        per_attr = {name: round(float(s[i]), 6) for name, s in scores.items()}
        rows.append(
            {
                "prompt_set": it.prompt_set,
                "prompt_index": it.prompt_index,
                "sample": it.sample,
                "prompt": it.prompt,
                "continuation": texts[i],
                "score": per_attr[first],
                "scores": per_attr,
                "domain": stamp["domain"],
                "model": stamp["model"],
                "seed": stamp["seed"],
                "gen": stamp["gen"],
                "new_tokens": len(token_lists[i]),
                "labelled_by": stamp["labelled_by"],
                "fingerprint": stamp["fingerprint"],
            }
        )
    return rows


def _stats(rows: list[dict], policy: Policy) -> dict[str, dict[str, float]]:
    threshold = policy.attributes[0].target.max_violation
    per: dict[str, list[float]] = {}
    for r in rows:
        per.setdefault(Path(r["prompt_set"]).name, []).append(float(r["score"]))
    return {
        name: {"rows": len(s), "frac_violating": sum(x > threshold for x in s) / len(s)}
        for name, s in per.items()
    }
