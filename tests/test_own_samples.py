"""The fine-tune's KL-only term on the model's own continuations (``regularization.own_samples``)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_train import (
    SIGNAL,
    _steps,
    attrctl,
    env,
    free_port,
    run_with_fault,
    weights,
    write_policy,
)

from attrctl.heads import RegularizerHead, forward_with_tap
from attrctl.models import load_model
from attrctl.policy import load_policy
from attrctl.policy.schema import HeadSpec
from attrctl.train.own_samples import OwnSamples, own_kl_step

OWN = {"lam": 0.1, "per_domain": {"toxic": 5.0},
       "own_samples": {"lam": 5.0, "rows": 2, "refresh_every": 4, "max_new_tokens": 5}}  # fmt: skip


def _ctx(policy_path: Path, rank: int = 0, world: int = 1):
    return SimpleNamespace(policy=load_policy(policy_path), rank=rank, world=world)


def test_rows_do_not_depend_on_the_rank_split_or_the_refresh_moment(tmp_path, monkeypatch):
    # one process plays each rank in turn: the shares stay unshared (torchrun gathers them; the
    # torchrun test below runs that)
    monkeypatch.setattr("attrctl.train.own_samples.gather_rows", lambda ctx, rows: rows)
    policy = write_policy(tmp_path, regularization={**OWN, "own_samples": {**OWN["own_samples"],
                                                                          "rows": 4}})  # fmt: skip
    loaded = load_model("tiny-random", device="cpu")
    model, tok = loaded.model.eval(), loaded.tokenizer

    def rows(world: int, steps: range) -> dict[int, tuple[list[int], int]]:
        out: dict[int, tuple[list[int], int]] = {}
        for rank in range(world):
            own = OwnSamples(_ctx(policy, rank, world), 1, tok)
            for step in steps:
                own.ensure(model, step)
                out.update({g: own.batch.rows[g] for g in own.rows_of_step(step)})
        return out

    one = rows(1, range(8))
    assert sorted(one) == list(range(32))  # 8 steps × 4 rows, every row once
    assert rows(2, range(8)) == one  # two ranks share the same rows between them
    # resuming at step 5 samples the window that began at step 4: the same rows as before
    assert rows(1, range(5, 8)) == {g: one[g] for g in range(20, 32)}
    # every prompt is continued once before any is continued twice (a permutation per pass)
    own = OwnSamples(_ctx(policy), 1, tok)
    n = len(own.prompts)
    assert sorted(own._prompt(g)[1] for g in range(n)) == list(range(n))
    # another iteration draws other rows
    other = OwnSamples(_ctx(policy), 2, tok)
    other.ensure(model, 0)
    assert [other.batch.rows[g] for g in range(4)] != [one[g] for g in range(4)]


def test_the_step_adds_lambda_times_kl_at_the_sampled_positions_only():
    torch.manual_seed(0)
    loaded = load_model("tiny-random", device="cpu")
    model = loaded.model
    head = RegularizerHead(HeadSpec(kind="linear", rank=4), model, tap=1)
    with torch.no_grad():
        head.weight.normal_(0, 1.0)
        head.bias.normal_(0, 1.0)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 2:5] = True
    mask[1, 3:6] = True
    lm_weight = model.get_output_embeddings().weight

    def forward(x):
        return forward_with_tap(model, [head.tap], x)

    model.zero_grad()
    kl = own_kl_step(forward, [head], ids, mask, lm_weight, scale=0.7, attr_weights=None,
                     impl="chunked")  # fmt: skip
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # the definition, with autograd: 0.7 · Σ_masked KL(sg[q] ‖ p), q ∝ p · σ(r)
    model.zero_grad()
    hidden, taps = forward(ids)
    logits = hidden[mask] @ lm_weight.T
    r = head.features(taps[head.tap])[mask] @ head.weight.T + head.bias
    log_q = torch.log_softmax(logits.detach() + torch.nn.functional.logsigmoid(r.detach()), -1)
    want_kl = (log_q.exp() * (log_q - torch.log_softmax(logits, -1))).sum(-1)
    (0.7 * want_kl.sum()).backward()
    torch.testing.assert_close(kl, want_kl.detach(), rtol=1e-4, atol=1e-6)
    assert int((kl > 1e-4).sum()) == int(mask.sum())  # a real KL at every masked position
    for name, p in model.named_parameters():
        if p.grad is not None and name in got:
            torch.testing.assert_close(got[name], p.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.ci
@pytest.mark.slow
def test_training_with_own_samples_changes_the_weights_and_resumes_bitwise(tmp_path):
    base = dict(SIGNAL, schedule={"mode": "sequential", "iterations": 1})
    (tmp_path / "plain").mkdir()
    plain = write_policy(tmp_path / "plain", **base)
    attrctl("train", "-p", plain, "--out", tmp_path / "plain" / "run", "-q", cwd=tmp_path / "plain")

    (tmp_path / "own").mkdir()
    own = write_policy(tmp_path / "own", **base, regularization=OWN)
    attrctl("train", "-p", own, "--out", tmp_path / "own" / "run", "-q", cwd=tmp_path / "own")
    steps = _steps(tmp_path / "own" / "run")
    assert all(r["kl_own"] > 0 for r in steps), [r.get("kl_own") for r in steps]
    assert not any("kl_own" in r for r in _steps(tmp_path / "plain" / "run"))
    ref = weights(tmp_path / "own" / "run", "iter_1")
    changed = weights(tmp_path / "plain" / "run", "iter_1")
    assert any(not torch.equal(ref[k], changed[k]) for k in ref)

    # killed after the step-2 checkpoint, inside the window sampled at step 0 (refresh_every 4):
    # the resumed run must regularize on the saved rows, not on rows drawn from step-2 weights
    (tmp_path / "killed").mkdir()
    killed = write_policy(tmp_path / "killed", **base, regularization=OWN)
    out = tmp_path / "killed" / "run"
    proc = run_with_fault(killed, out, tmp_path / "killed", "finetune/1:step=2:SIGKILL")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    saved = json.loads((out / "checkpoints" / "finetune_1" / "own_samples.json").read_text())
    assert saved["first"] == 0 and len(saved["rows"]) == 8
    attrctl("train", "--resume", out, "-q", cwd=tmp_path / "killed")
    resumed = weights(out, "iter_1")
    assert all(torch.equal(ref[k], resumed[k]) for k in ref)


def test_own_prompts_default_to_the_regularizers_and_can_be_named(tmp_path):
    default = write_policy(tmp_path, regularization=OWN)
    own = OwnSamples(_ctx(default), 1, tokenizer=None)
    assert {name for name, _, _ in own.prompts} == {"prompts.txt"}
    (tmp_path / "mine.txt").write_text("Only this one\n")
    named = write_policy(
        tmp_path, regularization={**OWN, "own_samples": {**OWN["own_samples"],
                                                         "prompts": ["mine.txt", "toxic"]}},
    )  # fmt: skip
    own = OwnSamples(_ctx(named), 1, tokenizer=None)
    names = [name for name, _, _ in own.prompts]
    assert names[0] == "mine.txt" and set(names[1:]) == {"toxic"} and len(names) == 161


@pytest.mark.ci
@pytest.mark.slow
def test_torchrun_two_ranks_resume_inside_a_window_on_the_gathered_rows(tmp_path):
    """Each rank samples its share of a window and the shares are gathered, so the checkpoint
    rank 0 writes holds every rank's rows: a 2-rank run killed inside a window resumes on them."""
    base = dict(SIGNAL, schedule={"mode": "sequential", "iterations": 1}, regularization=OWN)
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2",
                "--master-port", free_port(), "-m", "attrctl.cli", "train"]  # fmt: skip
    runs = {}
    for name, fault in (("whole", None), ("killed", "finetune/1:step=2:SIGKILL")):
        (tmp_path / name).mkdir()
        policy = write_policy(tmp_path / name, **base)
        out = tmp_path / name / "run"
        e = env() | ({"ATTRCTL_FAULT": fault} if fault else {})
        proc = subprocess.run([*torchrun, "-p", str(policy), "--out", str(out), "-q"],
                              cwd=tmp_path / name, env=e, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        if fault is None:
            assert proc.returncode == 0, proc.stderr[-3000:]
        else:
            assert proc.returncode != 0
            saved = json.loads(
                (out / "checkpoints" / "finetune_1" / "own_samples.json").read_text()
            )
            assert sorted(map(int, saved["rows"])) == list(range(8))  # both ranks' rows
            proc = subprocess.run([*torchrun, "--resume", str(out), "-q"], cwd=tmp_path / name,
                                  env=env(), capture_output=True, text=True, timeout=600)  # fmt: skip
            assert proc.returncode == 0, proc.stderr[-3000:]
        assert all(r["kl_own"] > 0 for r in _steps(out))
        runs[name] = weights(out, "iter_1")
    for k, v in runs["whole"].items():
        assert torch.equal(runs["killed"][k], v), k
