"""The sample job: S_i, continuations of the regularizer prompts from θ_i, scored by every oracle.

S_0 (the base model's samples) reuses the synthesized rows of the data mixture when their settings
match. Every job reads its inputs only from what the run directory's manifest lists
(:mod:`attrctl.train.plan`), writes its output under a temporary name, renames it into place, and
the schedule then publishes it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from attrctl.data.synth import ROW_FIELDS, read_rows, synth_source_of, work_items
from attrctl.errors import AttrctlError
from attrctl.faults import fault
from attrctl.paths import atomic_write
from attrctl.sampling import row_seed, sample_continuations
from attrctl.train import distributed as dist
from attrctl.train.context import TrainContext
from attrctl.train.weights import load_theta

SAMPLE_BATCH = 64  # continuations sampled together (rows are seeded one by one: any batch works)
TEMPERATURE, TOP_P = 1.0, 1.0  # regularizer samples come from the model's own distribution


def _reusable_synth(ctx: TrainContext) -> Path | None:
    """S_0 is the base model's continuations of the regularizer prompts — rows the synth data
    source already holds when its settings match (the same per-row seeds), so reuse them. The
    regularizer may use fewer samples per prompt or a subset of the prompt sets."""
    policy, reg = ctx.policy, ctx.policy.regularizer
    src = synth_source_of(policy)
    if not any(s is src for s in policy.data):
        return None
    same = (
        set(reg.prompts) <= set(src.prompts)
        and src.samples_per_prompt >= reg.samples_per_prompt
        and src.max_new_tokens == reg.max_new_tokens
        and (src.temperature, src.top_p) == (TEMPERATURE, TOP_P)
    )
    from attrctl.data.sources import synth_path

    path = synth_path(src, policy)
    return path if same and path.is_file() else None


def sample_job(ctx: TrainContext, i: int) -> dict[str, Any]:
    """Sample S_i: continuations of the regularizer prompts from θ_i, scored by every oracle."""
    start = time.perf_counter()
    reg = ctx.policy.regularizer
    items = work_items(reg)
    reuse = _reusable_synth(ctx) if i == 0 else None
    rows: list[dict] | None = None
    if reuse is not None:
        by_key = {(Path(r["prompt_set"]).name, r["prompt_index"], r["sample"]): r
                  for r in read_rows(reuse, required=ROW_FIELDS)}  # fmt: skip
        keys = [(Path(it.prompt_set).name, it.prompt_index, it.sample) for it in items]
        if all(k in by_key for k in keys):
            rows = [_sample_row(by_key[k], ctx) for k in keys]
    source = "synth" if rows is not None else "sampled"
    if rows is None:
        rows = _sample_rows(ctx, i, items)
    if ctx.writer:
        with atomic_write(ctx.run.samples(i)) as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    stats = sample_stats(ctx, rows)
    record = {"iteration": i, "rows": len(rows), "source": source, **stats,
              "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip
    return record


def _sample_row(r: dict, ctx: TrainContext) -> dict:
    return {
        "prompt_set": Path(r["prompt_set"]).name,
        "prompt_index": r["prompt_index"],
        "sample": r["sample"],
        "prompt": r["prompt"],
        "continuation": r["continuation"],
        "scores": {a.name: float(r["scores"][a.name]) for a in ctx.compiled.attributes},
    }


def _sample_rows(ctx: TrainContext, i: int, items) -> list[dict]:
    model, tok = load_theta(ctx, i, "sample")
    mine = items[ctx.rank :: ctx.world]  # prompts are sharded across ranks
    bar = ctx.bar(f"sample S_{i}", len(items), "row")
    rows = []
    for b in range(0, len(mine), SAMPLE_BATCH):
        batch = mine[b : b + SAMPLE_BATCH]
        seeds = [
            row_seed(ctx.policy.seed, it.prompt_set, it.prompt_index, it.sample) for it in batch
        ]
        toks = sample_continuations(
            model, tok, [it.prompt for it in batch], seeds,
            max_new_tokens=ctx.policy.regularizer.max_new_tokens,
            temperature=TEMPERATURE, top_p=TOP_P,
        )  # fmt: skip
        texts = tok.batch_decode(toks, skip_special_tokens=True)
        scores = {a.name: a.oracle.score(texts) for a in ctx.compiled.attributes}
        for j, it in enumerate(batch):
            rows.append({
                "prompt_set": Path(it.prompt_set).name, "prompt_index": it.prompt_index,
                "sample": it.sample, "prompt": it.prompt, "continuation": texts[j],
                "scores": {k: round(float(v[j]), 6) for k, v in scores.items()},
            })  # fmt: skip
        bar.update(len(batch) * ctx.world)
        fault(f"sample/{i}", batch=b // SAMPLE_BATCH + 1)
    bar.close()
    rows = dist.gather_rows(ctx, rows)
    order = {
        (Path(it.prompt_set).name, it.prompt_index, it.sample): n for n, it in enumerate(items)
    }
    return sorted(rows, key=lambda r: order[(r["prompt_set"], r["prompt_index"], r["sample"])])


_JUDGE: list = []


def _judge():
    """The independent judge (jigsaw_bilstm), or None where its package is not installed."""
    if not _JUDGE:
        from attrctl.oracles import build_oracle
        from attrctl.oracles.specs import JigsawBiLSTMSpec

        try:
            _JUDGE.append(build_oracle(JigsawBiLSTMSpec(kind="jigsaw_bilstm")))
        except AttrctlError:
            _JUDGE.append(None)
    return _JUDGE[0]


def sample_stats(ctx: TrainContext, rows: list[dict]) -> dict[str, Any]:
    """Violation rate (share of continuations at or above each attribute's ``max_violation``),
    overall and per prompt set, and the same under the independent judge."""
    out: dict[str, Any] = {"violation_rate": {}, "by_prompt_set": {}}
    sets = sorted({r["prompt_set"] for r in rows})
    for a in ctx.compiled.attributes:
        thr = a.target.max_violation
        flags = [r["scores"][a.name] >= thr for r in rows]
        out["violation_rate"][a.name] = float(np.mean(flags)) if flags else 0.0
        for s in sets:
            sub = [r["scores"][a.name] >= thr for r in rows if r["prompt_set"] == s]
            out["by_prompt_set"].setdefault(s, {})[a.name] = float(np.mean(sub))
    judge = _judge()
    if judge is not None and rows:
        scores = judge.score([r["continuation"] for r in rows])
        out["judge_violation_rate"] = float(np.mean(scores >= 0.5))
        for s in sets:
            sub = [sc >= 0.5 for sc, r in zip(scores, rows, strict=True) if r["prompt_set"] == s]
            out["by_prompt_set"][s]["judge"] = float(np.mean(sub))
    return out
