"""Toxic-domain data by sampling: continuations of prompt sets, labelled by the policy's oracles.

No toxic corpus ships in a registry package, so — as the paper builds its NADO data — we sample
continuations of hand-written toxic-leaning and neutral prompts from the base model and score each
continuation with every attribute's oracle. One jsonl row per continuation::

    {"prompt_set": "toxic", "prompt_index": 3, "sample": 1, "prompt": "Shut up, you",
     "continuation": " idiot, ...", "score": 0.91, "scores": {"toxicity": 0.91},
     "domain": "toxic", "model": "bundled:smollm2-135m-instruct", "seed": 0,
     "gen": {"max_new_tokens": 24, "temperature": 1.0, "top_p": 1.0}, "new_tokens": 24}

``score`` is the first attribute's violation probability of the *continuation* (as in
RealToxicityPrompts); ``scores`` has one entry per attribute.

**Determinism and resumption.** Each row samples from its own ``torch.Generator`` seeded from
(policy seed, prompt set, prompt index, sample index), so a row does not depend on which other
rows were sampled before it. The work list is cut into fixed batches; rows are appended and
fsynced batch by batch. A rerun reads the file, drops a partially written last line, and
regenerates every batch that is not complete — the whole batch, so the rows it keeps come from the
same batch composition and match an uninterrupted run bit for bit — appending only missing rows.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attrctl.data.prompt_sets import load_prompt_set
from attrctl.data.sources import synth_path
from attrctl.errors import AttrctlError
from attrctl.policy.schema import Policy, SynthSource
from attrctl.sampling import row_seed, sample_continuations

if TYPE_CHECKING:
    import torch


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


# ------------------------------------------------------------------------------------ the file
def read_rows(path: str | os.PathLike, *, repair: bool = False) -> list[dict[str, Any]]:
    """Rows of a synth jsonl file. A partially written last line (no newline) is ignored, and
    with ``repair=True`` also cut off the file.

    Raises:
        AttrctlError: a complete line is not a JSON object.
    """
    path = Path(path)
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    if repair and end < len(data):
        with path.open("r+b") as fh:
            fh.truncate(end)
            fh.flush()
            os.fsync(fh.fileno())
    rows = []
    for lineno, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise AttrctlError(f"{path}:{lineno}: corrupt row ({err.msg})") from None
        if not isinstance(row, dict):
            raise AttrctlError(f"{path}:{lineno}: corrupt row (not a JSON object)")
        rows.append(row)
    return rows


def _check_compatible(path: Path, rows: list[dict], expect: dict[str, Any]) -> None:
    for lineno, row in enumerate(rows, 1):
        diff = [k for k, v in expect.items() if row.get(k) != v]
        if diff:
            what = ", ".join(f"{k}: {row.get(k)!r} in the file vs {expect[k]!r} now" for k in diff)
            raise AttrctlError(
                f"{path}:{lineno}: the file was written with other settings ({what}); pass "
                f"another --out, or delete the file to start over"
            )


# -------------------------------------------------------------------------------- the driver
def synth_source_of(policy: Policy) -> SynthSource:
    """The policy's first ``kind: synth`` data source, else one with the schema's defaults."""
    for source in policy.data:
        if isinstance(source, SynthSource):
            return source
    return SynthSource(domain="toxic")


def work_items(source: SynthSource, limit: int | None = None) -> list[WorkItem]:
    """Every (prompt set, prompt, sample) to sample, in file order; ``limit`` prompts per set."""
    items = []
    for ref in source.prompts:
        pset = load_prompt_set(ref)
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
        AttrctlError: the file holds rows made with other settings, or is corrupt.
    """
    from tqdm.auto import tqdm

    from attrctl.policy.compile import compile_policy

    source = source or synth_source_of(policy)
    out = Path(out) if out is not None else synth_path(source, policy)
    if limit is not None and limit < 1:
        raise AttrctlError(f"--limit must be at least 1, got {limit}")
    items = work_items(source, limit)
    report = SynthReport(path=out)

    existing: list[dict] = []
    if out.exists():
        size = out.stat().st_size
        existing = read_rows(out, repair=True)
        report.dropped_partial_line = out.stat().st_size < size
    out.parent.mkdir(parents=True, exist_ok=True)

    model_spec = model if isinstance(model, str) else getattr(model, "spec", None) or policy.model
    gen = {
        "max_new_tokens": source.max_new_tokens,
        "temperature": source.temperature,
        "top_p": source.top_p,
    }
    _check_compatible(out, existing, {"model": model_spec, "seed": policy.seed, "gen": gen})
    done = {(r.get("prompt_set"), r.get("prompt_index"), r.get("sample")) for r in existing}
    wanted = {it.key for it in items}
    batches = [items[i : i + source.batch_size] for i in range(0, len(items), source.batch_size)]
    todo = [b for b in batches if any(it.key not in done for it in b)]

    rows = [
        r
        for r in existing
        if (r.get("prompt_set"), r.get("prompt_index"), r.get("sample")) in wanted
    ]
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
        with bar, out.open("a", encoding="utf-8") as fh:
            for n_batch, batch in enumerate(todo):
                if stop_after is not None and n_batch >= stop_after:
                    break
                new = _run_batch(batch, done, loaded, compiled, policy, source, model_spec, gen)
                fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))
                fh.flush()
                os.fsync(fh.fileno())  # a batch is on disk before the next one starts
                rows.extend(new)
                report.rows_written += len(new)
                report.new_tokens += sum(r["new_tokens"] for r in new)
                report.seconds = time.perf_counter() - start
                bar.update(len(new))
                bar.set_postfix_str(f"{report.tokens_per_s:.0f} tok/s")
    report.rows_total = len(rows)
    report.complete = {(r["prompt_set"], r["prompt_index"], r["sample"]) for r in rows} >= wanted
    report.per_set = _stats(rows, policy)
    return report


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
    model_spec: str,
    gen: dict[str, Any],
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
                "domain": source.domain,
                "model": model_spec,
                "seed": policy.seed,
                "gen": gen,
                "new_tokens": len(token_lists[i]),
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
