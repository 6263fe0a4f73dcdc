"""``fit_job``'s held-out split and its torchrun sharding.

The held-out split is by prompt: no prompt has samples on both sides, so the fit's AUC is measured
on prompts the heads were not fitted on. Under torchrun every global batch is shared among the
ranks without losing a sequence (a rank left without one pads at weight 0), and the consistency
rows are the draws one process makes over the global batch's rows. The last test fits the same
heads in one process and in a 2-rank gloo group and compares them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attrctl.train.fit import (
    MIN_PROMPTS_HELD_OUT,
    consistency_pairs,
    held_out_split,
    shard_batches,
    shard_consistency_pairs,
)


def _rows(samples_per_prompt: list[int]) -> list[dict]:
    """Sample rows, prompt p with samples_per_prompt[p] samples, in the order a sample file has."""
    rows = []
    for p, n in enumerate(samples_per_prompt):
        for s in range(n):
            rows.append({"prompt_set": "set.txt", "prompt_index": p, "sample": s,
                         "prompt": f"prompt number {p}", "continuation": f" sample {s}",
                         "scores": {"toxicity": 0.0}})  # fmt: skip
    return rows


# ------------------------------------------------------------------------------ held-out split
def test_no_prompt_is_on_both_sides_of_the_split():
    rows = _rows([1 + p % 4 for p in range(37)])  # 37 prompts of 1–4 samples
    splits = set()
    for seed in range(6):
        for i in (1, 2):
            held, train, split = held_out_split(rows, seed, i)
            held_prompts = {rows[j]["prompt"] for j in held}
            train_prompts = {rows[j]["prompt"] for j in train}
            assert not held_prompts & train_prompts
            assert sorted(held + train) == list(range(len(rows)))  # each sequence on one side
            assert len(held_prompts) == split["prompts"] == 3  # 10% of 37, rounded down
            assert len(held) == split["sequences"]
            assert split["of_prompts"] == 37 and split["of_sequences"] == len(rows)
            assert held_out_split(rows, seed, i) == (held, train, split)  # deterministic
            splits.add(frozenset(held_prompts))
    assert len(splits) > 1  # the seed and the iteration draw the held-out prompts


def test_a_prompt_is_its_text_whatever_its_set():
    # the same prompt text in two prompt sets is one prompt: both sides never share it
    rows = _rows([3] * 20)
    for r in rows[:30]:
        r["prompt_set"] = "other.txt"
    for r, twin in zip(rows[30:33], rows[:3], strict=True):
        r["prompt"] = twin["prompt"]  # prompt 10 of set.txt reads as prompt 0 of other.txt
    for seed in range(10):
        held, train, _ = held_out_split(rows, seed, 1)
        assert not {rows[j]["prompt"] for j in held} & {rows[j]["prompt"] for j in train}


def test_too_few_prompts_holds_none_out_and_says_so():
    rows = _rows([8] * (MIN_PROMPTS_HELD_OUT - 1))  # 72 sequences, 9 prompts
    held, train, split = held_out_split(rows, 0, 1)
    assert held == [] and sorted(train) == list(range(72))
    assert split["prompts"] == split["sequences"] == 0
    assert "9 prompts" in split["note"] and "every sequence" in split["note"]
    held, _, split = held_out_split(_rows([8] * MIN_PROMPTS_HELD_OUT), 0, 1)
    assert split["prompts"] == 1 and len(held) == 8 and "note" not in split


# ------------------------------------------------------------------------------ sharding
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 4, 5])
def test_shards_lose_no_sequence_and_every_rank_runs_every_step(world, batch_size):
    for n in range(0, 14):
        train = list(range(100, 100 + n))[::-1]
        n_rows = {j: (j * 7) % 5 for j in train}  # 0–4 continuation rows, some sequences none
        rows_of = [n_rows.get(j, 0) for j in range(200)]
        plans = [shard_batches(train, batch_size, rows_of, r, world) for r in range(world)]
        globals_ = [train[b : b + batch_size] for b in range(0, n, batch_size)]
        assert all(len(p) == len(globals_) for p in plans)  # one entry per step on every rank
        for b, g in enumerate(globals_):
            entries = [p[b] for p in plans]
            taken = [j for e in entries if not e["pad"] for j in e["index"]]
            assert sorted(taken) == sorted(g)  # every sequence once, on one rank
            total = sum(rows_of[j] for j in g)
            for r, e in enumerate(entries):
                assert e["pad"] == (r >= len(g))
                assert e["global_rows"] == total
                assert e["scale"] == (0.0 if e["pad"] else world / max(total, 1))
                assert len(e["draw"]) == (0 if e["pad"] else sum(rows_of[j] for j in e["index"]))
            draws = torch.cat([e["draw"] for e in entries])
            assert sorted(draws.tolist()) == list(range(total))  # each global row once


def test_ranks_draw_the_consistency_rows_one_process_draws():
    torch.manual_seed(0)
    train, batch_size, share = list(range(11)), 4, 0.25  # global batches of 4, 4 and 3
    rows_of = [int(x) for x in torch.randint(1, 9, (11,))]  # every sequence has rows to draw
    pair = [torch.rand(sum(rows_of[j] for j in train[b : b + batch_size])) < 0.8
            for b in range(0, 11, batch_size)]  # fmt: skip
    steps = [2, 0, 1, 2, 1, 0]  # two epochs, the short batch first as a shuffle may put it
    gen = torch.Generator().manual_seed(5)
    one = [consistency_pairs(pair[b], share, gen) for b in steps]  # one process, step by step
    for world in (2, 3, 4):  # 4: the short global batch pads rank 3
        for r in range(world):
            gen = torch.Generator().manual_seed(5)
            plan = shard_batches(train, batch_size, rows_of, r, world)
            for n, b in enumerate(steps):
                e = plan[b]
                fb = {"pair": pair[b][e["draw"]] if not e["pad"] else torch.ones(2, dtype=bool),
                      "draw": e["draw"], "global_rows": e["global_rows"], "pad": e["pad"]}  # fmt: skip
                got = shard_consistency_pairs(fb, share, gen)
                want = one[n][e["draw"]] if not e["pad"] else torch.zeros(2, dtype=bool)
                assert torch.equal(got, want), (world, r, n)
    # the draws did thin the pairs out (else the test would not tell draws apart)
    assert any(m.any() for m in one)
    assert not all(torch.equal(one[n], pair[b]) for n, b in enumerate(steps))


# ------------------------------------------------------------------------------ 2-rank fit
WORKER = r"""
import json, sys
from pathlib import Path
from attrctl.policy import compile_policy, load_policy
from attrctl.train import distributed as dist
from attrctl.train.context import TrainContext
from attrctl.train.fit import fit_job
from attrctl.train.rundir import RunDir

rank, world = dist.init_from_env("cpu")
ctx = TrainContext(compile_policy(load_policy(sys.argv[1])), RunDir(sys.argv[2]), rank=rank,
                   world=world)
record = fit_job(ctx, 1, 0)
if rank == 0:
    Path(sys.argv[2], "record.json").write_text(json.dumps(record))
"""

TEXTS = ["you stupid idiot", "shut up you moron", "what a damn loser", "go to hell you jerk",
         "the farmer planted beans", "rain is expected later", "the library opens at nine",
         "she painted the fence"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fit(folder: Path, world: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """R_1 fitted by `world` processes (a gloo group when 2) on the same published S_0."""
    folder.mkdir(parents=True)
    (folder / "corpus.txt").write_text("The sun rose over the hills.\n\nIt was a calm day.\n")
    policy = folder / "policy.yaml"
    policy.write_text(
        "name: split-test\nmodel: tiny-random\n"
        "data:\n  - {kind: file, path: corpus.txt, domain: general}\n"
        "attributes:\n  - {name: toxicity, oracle: {kind: profanity_check}, "
        "head: {kind: linear, rank: 8}}\n"
        "regularizer: {epochs: 3, learning_rate: 0.01, batch_size: 5}\n"
        "finetune: {method: top_layers, top_layers: 1}\nloss: {impl: chunked}\nseed: 3\n"
    )
    rows = _rows([1] * 23)  # 23 prompts: 2 held out, 21 train → global batches 5, 5, 5, 5, 1
    for k, r in enumerate(rows):
        r["continuation"] = " " + TEXTS[k % len(TEXTS)] + " " * (k % 3) + "and" * (k % 2)
        r["scores"]["toxicity"] = 0.9 if k % len(TEXTS) < 4 else 0.1
    from attrctl.train.rundir import RunDir

    run = RunDir(folder / "run")
    run.samples(0).parent.mkdir(parents=True, exist_ok=True)
    run.samples(0).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    run.publish("sample/0", {"iteration": 0, "rows": len(rows), "source": "test"})
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world))  # fmt: skip
    cmd = [sys.executable, "-c", WORKER, str(policy), str(run.root)]
    rank_env = [dict(env, RANK=str(r), LOCAL_RANK=str(r)) for r in range(world)]
    procs = [subprocess.Popen(cmd, cwd=folder, env=e, stderr=subprocess.PIPE, text=True)
             for e in rank_env]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    record = json.loads((run.root / "record.json").read_text())
    return record, load_file(str(run.heads(1) / "heads.safetensors"))


@pytest.mark.slow
def test_two_rank_fit_with_a_padded_rank_matches_one_process(tmp_path):
    """21 training sequences in global batches of 5: 3/2 sequences per rank, then a batch of one
    that pads rank 1 (the sharding of earlier versions dropped that 21st sequence). Losing no
    sequence and drawing the same consistency rows, the 2-rank heads are the 1-process heads up
    to fp32 summation order."""
    one, heads_one = _fit(tmp_path / "one", 1)
    two, heads_two = _fit(tmp_path / "two", 2)
    assert one["held_out"]["prompts"] == two["held_out"]["prompts"] == 2
    assert one["held_out"]["sequences"] == 2
    for name, a in heads_one.items():
        b = heads_two[name]
        rel = float((a - b).norm() / a.norm())
        print(f"\n{name}: |2-rank − 1-process| / |1-process| = {rel:.2e}")
        assert a.norm() > 0  # the fit moved the head off zero
        # Only fp32 sums in another order (~1e-7 relative each) differ, through 15 AdamW steps:
        # measured ≤ 2.5e-6 per tensor. Each fault this guards against moves some tensor by
        # > 1e-2 (measured by patching the worker): gradients not all-reduced 0.30–0.40, the
        # 21st sequence dropped 0.38–1.1, consistency rows drawn per rank 0.018–0.50.
        assert rel < 1e-4, name
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
