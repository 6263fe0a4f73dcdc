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

import hashlib
import inspect
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


def row_seed(seed: int, prompt_set: str, prompt_index: int, sample: int) -> int:
    """The sampling seed of one row, from (policy seed, set, prompt index, sample index).

    File prompt sets contribute their file name only, so moving a file keeps its seeds.
    """
    label = Path(prompt_set).name
    digest = hashlib.sha256(f"{seed}/{label}/{prompt_index}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ------------------------------------------------------------------------------------ sampling
def _next_token_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Sampling distribution ``[B, V]`` from last-position logits ``[B, V]``."""
    import torch

    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # [B, V]
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # [B, V]
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return probs


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token ids ``[B]`` drawn from ``probs`` ``[B, V]`` with uniforms ``u`` ``[B]`` in [0, 1).

    Each row depends only on its own probabilities and uniform. ``side="right"`` never lands on
    a zero-probability token (its CDF step is flat).
    """
    import torch

    cdf = probs.double().cumsum(-1)  # [B, V]; float64 so the tail of 49k terms stays exact
    target = (u.double() * cdf[:, -1]).unsqueeze(-1)  # [B, 1]
    idx = torch.searchsorted(cdf, target, side="right").squeeze(-1)  # [B]
    return idx.clamp(max=probs.shape[-1] - 1)


def sample_continuations(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> list[list[int]]:
    """Sample one continuation per prompt with a KV cache, each row from its own generator.

    HF ``generate`` draws every row from the global RNG, so a row's sample would depend on its
    batch-mates; here row ``i`` draws only from ``torch.Generator().manual_seed(seeds[i])``
    (one uniform per step, turned into a token by inverse-CDF lookup).

    Args:
        model: a causal LM (``model(input_ids, attention_mask, position_ids, past_key_values)``).
        tokenizer: its tokenizer; must have a pad token. Prompts are left-padded.
        prompts: ``B`` prompt strings.
        seeds: ``B`` seeds, one per row.
        max_new_tokens: tokens to sample per row; a row stops early at a stop token
            (:func:`stop_token_ids`).
        temperature: softmax temperature.
        top_p: nucleus mass (1.0: plain sampling).

    Returns:
        ``B`` lists of sampled token ids, the stop token excluded.
    """
    import torch

    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set one before sampling")
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    input_ids = enc["input_ids"].to(device)  # [B, P]
    attn = enc["attention_mask"].to(device)  # [B, P]
    # Left padding must not shift the real tokens' positions: count them from the mask.
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # [B, P]
    batch = input_ids.shape[0]
    # One uniform per row and step, drawn up front from the row's own generator: sampling is then
    # one batched inverse-CDF lookup per step instead of B multinomial calls (~1 ms each at V=49k).
    uniforms = torch.stack(
        [torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )  # [B, max_new_tokens]
    stop = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}

    tokens: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    with torch.inference_mode():
        out = model(input_ids=input_ids, attention_mask=attn, position_ids=pos, **extra)
        for step in range(max_new_tokens):
            probs = _next_token_probs(out.logits[:, -1], temperature, top_p).cpu()  # [B, V]
            picked = _inverse_cdf(probs, uniforms[:, step]).tolist()
            for i, tok in enumerate(picked):
                if done[i]:
                    continue
                if tok in stop:
                    done[i] = True
                else:
                    tokens[i].append(tok)
            if all(done) or step == max_new_tokens - 1:
                break
            feed = torch.tensor(
                [pad if d else t for d, t in zip(done, picked, strict=True)], device=device
            )
            attn = torch.cat([attn, attn.new_ones(batch, 1)], dim=1)  # [B, P + step + 1]
            pos = pos[:, -1:] + 1  # [B, 1]
            out = model(
                input_ids=feed[:, None],  # [B, 1]
                attention_mask=attn,
                position_ids=pos,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
    return tokens


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Token ids that end a continuation: the tokenizer's and generation config's eos, and every
    other special token (an instruct model ends plain text with ``<|endoftext|>``, not its chat
    eos; no special token is plain text)."""
    ids = {tokenizer.eos_token_id, *getattr(tokenizer, "all_special_ids", [])}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return {int(i) for i in ids if i is not None}


def _accepts(model: Any, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


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
