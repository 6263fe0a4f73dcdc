"""The fit job: heads R_i fitted on a sample set S_j with ``head_fit_loss`` (the model frozen).

Features of the samples are computed once; 10% of the prompts are held out for the fit metrics
(AUC, accuracy, BCE); under torchrun the batches are sharded across ranks with the global
normalisation of the single-process fit.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

import numpy as np
import torch

from attrctl.data.synth import ROW_FIELDS, read_rows
from attrctl.errors import AttrctlError
from attrctl.faults import fault
from attrctl.heads import forward_with_tap, head_taps
from attrctl.heads_io import load_heads, save_heads
from attrctl.losses import head_fit_loss
from attrctl.train import distributed as dist
from attrctl.train.context import TrainContext
from attrctl.train.weights import load_theta


def _encode(tok, rows: list[dict]) -> list[tuple[list[int], int]]:
    """(prompt + continuation ids, prompt length) per row: the prompt as the sampler encoded it
    (:func:`attrctl.sampling.prompt_token_ids` — BOS where the tokenizer adds one, a start token
    for an empty prompt), the continuation without special tokens. The heads are then fitted on
    the positions sampling and guided decoding use them at."""
    from attrctl.sampling import prompt_token_ids

    prompts = prompt_token_ids(tok, [r["prompt"] for r in rows])
    out = []
    for r, p in zip(rows, prompts, strict=True):
        c = tok(r["continuation"], add_special_tokens=False)["input_ids"]
        out.append((p + c, len(p)))
    return out


def _features(model, taps, encoded, batches: list[list[int]]) -> list[dict]:
    """Frozen features of sample sequences, computed once per sample set (the fit reads the same
    detached states the fine-tune feeds the heads). Per mini-batch (a list of sequence indices):
    the LM's final states at the rows that predict a continuation token, the taps over the whole
    right-padded sequences, the next tokens, and row bookkeeping."""
    out = []
    dev = next(model.parameters()).device
    for index in batches:
        chunk = [encoded[j] for j in index]
        t = max(len(ids) for ids, _ in chunk)
        ids = torch.zeros(len(chunk), t, dtype=torch.long)  # right padding: causal rows unaffected
        attn = torch.zeros(len(chunk), t, dtype=torch.long)
        rows = torch.zeros(len(chunk), t, dtype=torch.bool)  # row (b, t) predicts ids[b, t+1]
        for j, (seq, plen) in enumerate(chunk):
            ids[j, : len(seq)] = torch.tensor(seq)
            attn[j, : len(seq)] = 1
            rows[j, max(plen - 1, 0) : len(seq) - 1] = True
        with torch.no_grad():
            hidden, tapped = forward_with_tap(model, taps, ids.to(dev), attn.to(dev))
        nxt = torch.cat([ids[:, 1:], ids.new_zeros(len(chunk), 1)], 1)  # [b, T]
        first = rows & ~torch.cat([rows.new_zeros(len(chunk), 1), rows[:, :-1]], 1)
        out.append({
            "hidden": hidden[rows.to(dev)].float().cpu(),  # [n, H]
            "taps": {k: v.float().cpu() for k, v in tapped.items()},  # [b, T, H]
            "rows": rows, "tokens": nxt[rows], "pair": ~first[rows],
            "index": list(index), "last": _last_rows(rows),
        })  # fmt: skip
    return out


def _last_rows(rows: torch.Tensor) -> torch.Tensor:
    """Index (into the compacted rows) of each sequence's last continuation row; -1 if none."""
    counts = rows.sum(1)
    ends = counts.cumsum(0) - 1
    return torch.where(counts > 0, ends, torch.full_like(ends, -1))


def fit_job(ctx: TrainContext, i: int, sample_index: int | None) -> dict[str, Any]:
    """Fit heads R_i on S_{sample_index} with ``head_fit_loss``; ``None`` (no samples exist yet):
    R_i is the zero heads. The schedule has checked that S_{sample_index} and θ_{sample_index}
    are published (:class:`attrctl.train.plan.FitJob`)."""
    start = time.perf_counter()
    reg = ctx.policy.regularizer
    if sample_index is None:
        model, _ = load_theta(ctx, 0, "fit")
        heads = load_heads(ctx.compiled, model, None)
        if ctx.writer:
            meta = {"iteration": i, "fitted": False, "samples": None,
                    "attributes": [a.name for a in ctx.compiled.attributes]}  # fmt: skip
            save_heads(heads, ctx.run.heads(i), meta)
        return {"iteration": i, "fitted": False, "seconds": round(time.perf_counter() - start, 3)}

    rows = read_rows(ctx.run.samples(sample_index), required=ROW_FIELDS)
    if not rows:
        raise AttrctlError(f"{ctx.run.samples(sample_index)}: no samples to fit heads on")
    model, tok = load_theta(ctx, sample_index, "fit")
    lm_weight = model.get_output_embeddings().weight.detach().float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.policy.seed + 7919)
        heads = ctx.compiled.build_heads(model)
    heads.to(lm_weight.device).train()
    taps = head_taps(heads)

    # 10% of the prompts held out (all of their samples) for the fit metrics, see held_out_split
    held, train, split = held_out_split(rows, ctx.policy.seed, i)
    labels = np.stack([a.labels(np.array([r["scores"][a.name] for r in rows]))
                       for a in ctx.compiled.attributes])  # [K, S]  # fmt: skip
    encoded = _encode(tok, rows)
    bs = reg.batch_size
    n_rows = [len(ids) - max(plen, 1) for ids, plen in encoded]
    shards = shard_batches(train, bs, n_rows, ctx.rank, ctx.world)
    feats = _features(model, taps, encoded, [s["index"] for s in shards])
    for fb, s in zip(feats, shards, strict=True):
        if not s["pad"] and int(fb["rows"].sum()) != len(s["draw"]):
            raise AssertionError("fit: row count of a shard differs from its sequences' rows")
        fb.update(scale=s["scale"], draw=s["draw"], global_rows=s["global_rows"], pad=s["pad"])
    held_feats = _features(
        model, taps, encoded, [held[b : b + bs] for b in range(0, len(held), bs)]
    )

    fit_model = dist.wrap(ctx, _HeadFeatures(heads))
    opt = ctx.compiled.head_optimizer([p for p in heads.parameters() if p.requires_grad])
    impl = ctx.policy.loss.impl
    bar = ctx.bar(f"fit R_{i}", reg.epochs * len(feats), "batch")
    rng = random.Random(f"fit-order/{ctx.policy.seed}/{i}")
    pairs = torch.Generator().manual_seed(ctx.policy.seed * 7 + i)  # consistency rows per step
    mu = reg.consistency_weight / reg.consistency_rows
    history = []
    for _ in range(reg.epochs):
        perm = list(range(len(feats)))
        rng.shuffle(perm)
        total, count = 0.0, 0
        for bi in perm:
            fb = feats[bi]
            y = torch.as_tensor(labels[:, fb["index"]], dtype=torch.float32)  # [K, b]
            pair = shard_consistency_pairs(fb, reg.consistency_rows, pairs)
            loss = _head_loss(fit_model, heads, fb, y, pair, lm_weight, mu, impl)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + loss.item(), count + 1
            bar.update(1, loss=f"{total / count:.4f}")
            fault(f"fit/{i}", step=len(history) * len(perm) + count)
        history.append(dist.all_reduce_mean(ctx, total / max(count, 1)))
    bar.close()
    heads.eval()
    metrics = _held_out_metrics(heads, held_feats, labels, lm_weight, ctx, split)
    record = {"iteration": i, "fitted": True, "samples": sample_index, "epochs": reg.epochs,
              "attributes": [a.name for a in ctx.compiled.attributes],
              "train_loss": history, "held_out": split, **metrics,
              "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip
    if ctx.writer:
        save_heads(heads, ctx.run.heads(i), record)
    return record


HELD_OUT_SHARE = 0.1  # of the prompts, when there are at least MIN_PROMPTS_HELD_OUT
MIN_PROMPTS_HELD_OUT = 10  # fewer prompts: none held out, the fit metrics are not measured


def held_out_split(rows: list[dict], seed: int, i: int) -> tuple[list[int], list[int], dict]:
    """(held-out, training) sequence indices and a description of the split, for fitting R_i.

    The split is by prompt (a prompt is its text): every sample of a held-out prompt is held out,
    so the fit metrics measure the head on prompts it was not fitted on — several samples of one
    prompt on both sides would make them optimistic. ``HELD_OUT_SHARE`` of the distinct prompts
    are held out (a seeded draw, the same on every rank and every resume); with fewer than
    ``MIN_PROMPTS_HELD_OUT`` prompts none is, every sequence trains and the metrics are recorded
    as not measured. Training sequences come in a seeded shuffled order."""
    prompts = sorted({r["prompt"] for r in rows})
    random.Random(f"fit-prompts/{seed}/{i}").shuffle(prompts)
    n_held = int(len(prompts) * HELD_OUT_SHARE) if len(prompts) >= MIN_PROMPTS_HELD_OUT else 0
    held_prompts = set(prompts[:n_held])
    order = list(range(len(rows)))
    random.Random(f"fit/{seed}/{i}").shuffle(order)
    held = [j for j in order if rows[j]["prompt"] in held_prompts]
    train = [j for j in order if rows[j]["prompt"] not in held_prompts]
    split = {"by": "prompt", "prompts": n_held, "sequences": len(held),
             "of_prompts": len(prompts), "of_sequences": len(rows)}  # fmt: skip
    if not n_held:
        split["note"] = (f"no prompt held out: {len(prompts)} prompts, fewer than "
                         f"{MIN_PROMPTS_HELD_OUT}; heads fitted on every sequence")  # fmt: skip
    return held, train, split


def shard_batches(train: list[int], batch_size: int, n_rows: list[int], rank: int,
                  world: int) -> list[dict]:  # fmt: skip
    """This rank's share of every global batch of the fit, losing no sequence.

    Global batches are ``batch_size`` consecutive sequences of ``train`` (the last one may be
    short); rank r takes every world-th sequence of each, from the r-th. Each rank scales its row
    sum by ``world / rows of the global batch``, so DDP's gradient average over ranks is the
    single-process mean over the global batch, however unevenly the batch splits. A rank left
    without a sequence (a last batch shorter than ``world``) gets a padding entry — the batch's
    first sequence at weight 0 — so that every rank runs every step and joins every all-reduce.

    Per global batch: ``index`` (sequences), ``scale``, ``pad``, ``global_rows`` (continuation
    rows of the whole global batch) and ``draw``, the positions of this rank's rows among the
    global batch's rows, in order (so per-row random draws over the global batch are the same
    draws as in one process)."""
    out = []
    for b in range(0, len(train), batch_size):
        g = train[b : b + batch_size]
        offsets = np.concatenate([[0], np.cumsum([n_rows[j] for j in g])]).astype(int)
        mine = list(range(rank, len(g), world))
        draw = [torch.arange(offsets[m], offsets[m + 1]) for m in mine]
        out.append({
            "index": [g[m] for m in mine] or [g[0]],
            "scale": world / max(int(offsets[-1]), 1) if mine else 0.0,
            "pad": not mine,
            "global_rows": int(offsets[-1]),
            "draw": torch.cat(draw) if draw else torch.zeros(0, dtype=torch.long),
        })  # fmt: skip
    return out


def shard_consistency_pairs(fb: dict, share: float, gen: torch.Generator) -> torch.Tensor:
    """:func:`consistency_pairs` for one rank's share of a global batch: the generator draws over
    all of the global batch's rows on every rank (as one process draws) and each rank keeps the
    draws of its own rows, so the rows the consistency term counts are those of one process. A
    padding entry draws too (and keeps none), so the generator stays in step on every rank."""
    if share >= 1.0:
        return torch.zeros_like(fb["pair"]) if fb["pad"] else fb["pair"]
    draws = torch.rand(fb["global_rows"], generator=gen)
    if fb["pad"]:
        return torch.zeros_like(fb["pair"])  # counts nothing (its loss has weight 0 as well)
    return fb["pair"] & (draws[fb["draw"]] < share)


def consistency_pairs(pair: torch.Tensor, share: float, gen: torch.Generator) -> torch.Tensor:
    """The rows of one step's consistency estimate: each pair row kept with probability
    ``share`` (the caller weights the term by ``1/share``)."""
    if share >= 1.0:
        return pair
    return pair & (torch.rand(pair.shape, generator=gen) < share)


class _HeadFeatures(torch.nn.Module):
    """All heads' features from cached taps: the module DDP wraps when fitting is sharded."""

    def __init__(self, heads: torch.nn.ModuleList):
        super().__init__()
        self.heads = heads

    def forward(self, taps: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        return [h.features(taps[h.tap]) for h in self.heads]


def _head_loss(fit_model, heads, fb, y, pair, lm_weight, mu, impl):
    """Σ_k head_fit_loss of head k on one mini-batch of cached features, the consistency on the
    rows of ``pair``."""
    total = 0.0
    n_rows = fb["rows"]
    feats = fit_model(fb["taps"])  # list of [b, T, Hk], one per head (DDP-wrapped when sharded)
    for k, head in enumerate(heads):
        states = feats[k][n_rows]  # [n, Hk]
        per_row_y = y[k].unsqueeze(1).expand_as(n_rows)[n_rows]  # [n]
        out = head_fit_loss(
            fb["hidden"], lm_weight, states, head.weight, head.bias, fb["tokens"], per_row_y,
            mu=mu, pair_mask=pair, impl=impl, reduction="sum",
        )  # fmt: skip
        total = total + out.loss * fb["scale"]
    return total


@torch.no_grad()
def _held_out_metrics(heads, held_feats, labels, lm_weight, ctx, split) -> dict[str, Any]:
    """Per head on the sequences of the held-out prompts (none of their samples was fitted on):
    BCE of the taken token, accuracy and AUC of the head's estimate at the last continuation
    token, R(x) ≈ P(satisfies | x), against the label. Without held-out prompts every head's
    metrics are None (not measured)."""
    out: dict[str, Any] = {"heads": {}}
    if not held_feats:
        for a in ctx.compiled.attributes:
            out["heads"][a.name] = {"bce": None, "accuracy": None, "auc": None, "held_out": 0,
                                    "held_out_prompts": 0, "positive_rate": None}  # fmt: skip
        return out
    for k, (a, head) in enumerate(zip(ctx.compiled.attributes, heads, strict=True)):
        bces, preds, ys = [], [], []
        for fb in held_feats:
            rows = fb["rows"]
            states = head.features(fb["taps"][head.tap])[rows]  # [n, Hk]
            a_t = (states * head.weight[fb["tokens"]]).sum(-1) + head.bias[fb["tokens"]]  # [n]
            y_seq = torch.as_tensor(labels[k, fb["index"]], dtype=torch.float32)  # [b]
            y_rows = y_seq.unsqueeze(1).expand_as(rows)[rows]
            bce = torch.nn.functional.binary_cross_entropy_with_logits(a_t, y_rows, reduction="sum")
            bces.append(float(bce))
            last = fb["last"]
            ok = last >= 0
            preds += torch.sigmoid(a_t[last[ok]]).tolist()
            ys += y_seq[ok].tolist()
        n_rows = sum(int(fb["rows"].sum()) for fb in held_feats)
        preds_a, ys_a = np.array(preds), np.array(ys) >= 0.5
        out["heads"][a.name] = {
            "bce": sum(bces) / max(n_rows, 1),
            "accuracy": float(np.mean((preds_a >= 0.5) == ys_a)) if len(ys_a) else math.nan,
            "auc": auc(preds_a, ys_a),
            "held_out": len(ys_a),  # sequences, all the samples of the held-out prompts
            "held_out_prompts": split["prompts"],
            "positive_rate": float(np.mean(ys_a)) if len(ys_a) else math.nan,
        }
    return out


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (ties count half); NaN when one class is absent."""
    scores, positive = np.asarray(scores, dtype=float), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
