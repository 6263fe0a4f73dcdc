"""`attrctl train` on tiny-random: schedules, SIGKILL-and-resume, torchrun, errors.

Each run is a real `attrctl train` process (as a user runs it) on a 2-layer random Llama with small
local data files, a few steps per iteration. Processes run with one thread so that results are
bitwise reproducible across runs (CPU kernels are deterministic for a fixed thread count).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TOXIC = [
    "You are a stupid idiot and everyone hates you.",
    "Shut up, you worthless moron.",
    "What a damn pathetic loser you are.",
    "Go to hell, you dumb jerk.",
]
GENERAL = [
    "The committee met on Tuesday to discuss the budget for the coming year.",
    "Rain is expected in the north later this week, with sunshine in the south.",
    "She planted tomatoes, beans and basil in the small garden behind the house.",
    "The library opens at nine and closes at six on weekdays.",
]
PROMPTS = ["You are such a", "The weather today is", "I think that you", "My favourite food is"]


def write_policy(tmp: Path, name: str = "tiny", **extra) -> Path:
    (tmp / "toxic.txt").write_text("\n\n".join(TOXIC * 6))
    (tmp / "general.txt").write_text("\n\n".join(GENERAL * 6))
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    attributes = extra.pop("attributes", None) or [
        {"name": "toxicity", "oracle": {"kind": "profanity_check"},
         "head": {"kind": "linear", "rank": 8}}
    ]  # fmt: skip
    policy = {
        "name": name,
        "model": "tiny-random",
        "data": [
            {"kind": "file", "path": "toxic.txt", "domain": "toxic", "weight": 0.5},
            {"kind": "file", "path": "general.txt", "domain": "general", "weight": 0.5},
        ],
        "attributes": attributes,
        "regularization": {"lam": 0.1, "per_domain": {"toxic": 5.0}},
        "regularizer": {"prompts": ["prompts.txt"], "samples_per_prompt": 3,
                        "max_new_tokens": 6, "epochs": 2, "batch_size": 4},
        "finetune": {"method": "top_layers", "top_layers": 1, "steps": 6, "batch_size": 4,
                     "seq_len": 16, "checkpoint_every": 2, "learning_rate": 1e-3},
        "schedule": {"mode": "sequential", "iterations": 2},
        "loss": {"impl": "chunked"},
    }  # fmt: skip
    for key, value in extra.items():
        section, _, field = key.partition("__")
        if field:
            policy[section][field] = value
        else:
            policy[section] = value
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(policy))  # JSON is YAML
    return path


def env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    return e


def attrctl(*args, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "attrctl.cli", *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def weights(run: Path, what: str = "iter_2") -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / what / "trainable.safetensors"))


def final_ce(run: Path) -> float:
    state = json.loads((run / "state.json").read_text())
    return state["jobs"]["finetune/2"]["ce_last"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted sequential run, shared by the comparisons below."""
    tmp = tmp_path_factory.mktemp("ref")
    policy = write_policy(tmp)
    proc = attrctl("train", "-p", policy, "--out", tmp / "run", "-q", cwd=tmp)
    return tmp / "run", proc


@pytest.mark.ci
@pytest.mark.slow
def test_sequential_run_directory_and_summary(reference_run):
    run, proc = reference_run
    state = json.loads((run / "state.json").read_text())["jobs"]
    for job in ("sample/0", "fit/1", "finetune/1", "sample/1", "fit/2", "finetune/2", "sample/2"):
        assert job in state, job
    assert state["fit/1"]["fitted"] and state["fit/1"]["samples"] == 0
    assert state["finetune/2"]["heads"] == 2  # sequential: θ_i trains with R_i
    for f in (
        "policy.yaml",
        "run.json",
        "metrics.jsonl",
        "plots/training.png",
        "model/final/config.json",
        "model/final/model.safetensors",
        "heads/iter_2/heads.safetensors",
        "samples/iter_0.jsonl",
        "samples/iter_2.jsonl",
    ):
        assert (run / f).is_file(), f  # fmt: skip
    assert not (run / "lock").exists() and not list((run / "checkpoints").glob("*"))
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6] * 2
    for key in ("ce", "kl", "loss", "lam_kl_by_domain", "head_value", "tokens_per_s", "peak_mb"):
        assert key in steps[-1]
    assert "violation rate" in proc.stdout and "model/final" in proc.stdout
    # the exported folder loads with plain transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "model" / "final")
    assert model.config.num_hidden_layers == 2


@pytest.mark.ci
@pytest.mark.slow
def test_parallel_matches_sequential_within_tolerance(reference_run, tmp_path):
    run, _ = reference_run
    policy = write_policy(tmp_path, schedule={"mode": "parallel", "iterations": 2})
    proc = attrctl("train", "-p", policy, "--out", tmp_path / "run", "-q", cwd=tmp_path)
    assert "critical path" in proc.stdout
    state = json.loads((tmp_path / "run" / "state.json").read_text())["jobs"]
    # parallel: θ_i trains with R_{i−1}; R_1 had no samples (zero head), R_2 fit on S_0
    assert state["finetune/1"]["heads"] == 0 and state["finetune/2"]["heads"] == 1
    assert state["fit/2"]["samples"] == 0 and not state["fit/1"]["fitted"]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    par = [r for r in metrics if r["kind"] == "parallel_iteration"]
    assert len(par) == 2 and all(r["critical_path_s"] <= r["sequential_sum_s"] for r in par)
    # Same data, seed and steps; only which head regularizes differs, and the heads fitted on a
    # few dozen samples of a random model are weak: final CE agrees within 0.02 nats (CE ≈ 6.3;
    # an unregularized vs λ·KL-regularized difference at these heads is ~1e-3).
    assert abs(final_ce(tmp_path / "run") - final_ce(run)) < 0.02


def _kill_when(
    proc: subprocess.Popen, ready, timeout: float = 300, sig=signal.SIGKILL, poll: float = 0.05
) -> None:
    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (exit {proc.returncode}) before the kill point")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("kill point not reached")
        time.sleep(poll)
    os.kill(proc.pid, sig)
    proc.wait(timeout=120)


@pytest.mark.ci
@pytest.mark.slow
@pytest.mark.parametrize("moment", ["fine-tune checkpoint", "fitting", "SIGTERM mid fine-tune"])
def test_sigkill_and_resume_is_bitwise_identical(reference_run, tmp_path, moment):
    ref, _ = reference_run
    # checkpoints do not change the computation: with none on schedule, SIGTERM's is the only one
    extra = {"finetune__checkpoint_every": 100} if moment.startswith("SIGTERM") else {}
    policy = write_policy(tmp_path, **extra)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "attrctl.cli", "train", "-p", str(policy), "--out", str(out), "-q"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stderr=subprocess.DEVNULL)
    if moment == "fine-tune checkpoint":  # mid fine-tune of iteration 2, after a checkpoint
        _kill_when(proc, lambda: (out / "checkpoints" / "finetune_2" / "state.json").exists())
        assert (out / "lock").exists()  # the killed process never released it
    elif moment == "fitting":  # as soon as iteration 2's fitting starts (S_1 published)
        _kill_when(proc, lambda: '"sample/1"' in _read(out / "state.json"))
    else:  # SIGTERM after step 1 of θ_1: the step finishes, a checkpoint is saved, exit 130
        # (the signal must land before θ_1's 6 tiny steps end: polled often, sent early — at
        # step 3 with 50 ms polls it once landed after the fine-tune had finished)
        _kill_when(proc, lambda: '"step": 1' in _read(out / "metrics.jsonl"), sig=signal.SIGTERM,
                   poll=0.005)  # fmt: skip
        assert proc.returncode == 130
        state = json.loads((out / "checkpoints" / "finetune_1" / "state.json").read_text())
        assert 1 <= state["step"] < 6
        assert not (out / "lock").exists()
    attrctl("train", "--resume", out, "-q", cwd=tmp_path)
    a, b = weights(ref), weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from uninterrupted run"
    heads_a = load_file(str(ref / "heads" / "iter_2" / "heads.safetensors"))
    heads_b = load_file(str(out / "heads" / "iter_2" / "heads.safetensors"))
    assert all(torch.equal(heads_a[k], heads_b[k]) for k in heads_a)
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "step"] == [1, 2, 3, 4, 5, 6] * 2


def _tiny_params() -> dict[str, torch.Tensor]:
    from attrctl.models import load_model

    return {k: v.detach() for k, v in load_model("tiny-random").model.named_parameters()}


def _steps(run: Path) -> list[dict]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == "step"]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@pytest.mark.ci
@pytest.mark.slow
def test_torchrun_two_ranks_matches_one_process(reference_run, tmp_path):
    ref, _ = reference_run
    policy = write_policy(tmp_path)
    out = tmp_path / "run"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", "29517", "-m", "attrctl.cli",
           "train", "-p", str(policy), "--out", str(out), "-q"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Same global batch: each rank takes half the rows, DDP averages the gradients; sampled
    # continuations match row for row (per-row seeds). What differs is the order of fp32 sums
    # (~1e-7 relative), and AdamW turns coordinates whose gradient is at rounding level into
    # ±lr steps either way. So the stated tolerance is on the whole update: the 2-rank update
    # differs from the 1-process one by < 1% of its norm (measured ~0.15%), and the per-step CE
    # agrees to 1e-5.
    base = _tiny_params()
    a, b = weights(ref), weights(out)
    diff = sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5
    update = sum(((a[k] - base[k]) ** 2).sum() for k in a) ** 0.5
    assert diff / update < 0.01, f"2-rank vs 1-process update differs by {diff / update:.2%}"
    ce = [[r["ce"] for r in _steps(run)] for run in (ref, out)]
    assert len(ce[0]) == len(ce[1]) == 12
    assert max(abs(x - y) for x, y in zip(*ce, strict=True)) < 1e-5
    rows_ref = (ref / "samples" / "iter_0.jsonl").read_text().splitlines()
    rows_ddp = (out / "samples" / "iter_0.jsonl").read_text().splitlines()
    assert [json.loads(r)["continuation"] for r in rows_ref] == [
        json.loads(r)["continuation"] for r in rows_ddp
    ]


@pytest.mark.ci
@pytest.mark.slow
def test_two_attribute_policy_trains(tmp_path):
    attributes = [
        {"name": "toxicity", "oracle": {"kind": "profanity_check"},
         "head": {"kind": "linear", "rank": 8}},
        {"name": "tone", "oracle": {"kind": "vader"}, "target": {"labels": "soft"},
         "weight": 0.5, "head": {"kind": "mlp", "hidden_size": 16, "rank": 4}},
    ]  # fmt: skip
    policy = write_policy(tmp_path, attributes=attributes, schedule={"iterations": 1})
    proc = attrctl("train", "-p", policy, "--out", tmp_path / "run", "-q", cwd=tmp_path)
    state = json.loads((tmp_path / "run" / "state.json").read_text())["jobs"]
    assert set(state["fit/1"]["heads"]) == {"toxicity", "tone"}
    heads = load_file(str(tmp_path / "run" / "heads" / "iter_1" / "heads.safetensors"))
    assert heads["0.weight"].shape[1] == 8 and heads["1.weight"].shape[1] == 4
    assert heads["1.weight"].abs().sum() > 0  # the tone head was fitted, not left at zero
    assert "tone" in proc.stdout


# ------------------------------------------------------------------------------ bad input
def _no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "error:" in proc.stderr


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.ci
@pytest.mark.slow
def test_run_dir_of_another_policy_is_refused_untouched(reference_run, tmp_path):
    ref, _ = reference_run
    copy = tmp_path / "run"
    shutil.copytree(ref, copy)
    before = _snapshot(copy)
    other = write_policy(tmp_path, name="other")
    proc = attrctl("train", "-p", other, "--out", copy, "-q", cwd=tmp_path, check=False)
    _no_traceback(proc)
    assert "another policy" in proc.stderr
    assert _snapshot(copy) == before


@pytest.mark.ci
@pytest.mark.slow
@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path, damage):
    # 40 steps, a checkpoint every 2: the kill point (a published checkpoint of θ_1, removed when
    # the job ends) lasts ~38 steps; at 6 steps the job could end between two polls (it did once).
    policy = write_policy(tmp_path, finetune__steps=40)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "attrctl.cli", "train", "-p", str(policy), "--out", str(out), "-q"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stderr=subprocess.DEVNULL)
    _kill_when(proc, lambda: (out / "checkpoints" / "finetune_1" / "state.json").exists())
    ckpt = out / "checkpoints" / "finetune_1"
    if damage == "corrupt":
        data = (ckpt / "trainable.safetensors").read_bytes()
        (ckpt / "trainable.safetensors").write_bytes(data[: len(data) // 2])
    else:
        (ckpt / "optimizer.safetensors").unlink()
    before = _snapshot(out)
    res = attrctl("train", "--resume", out, "-q", cwd=tmp_path, check=False)
    _no_traceback(res)
    assert str(ckpt) in res.stderr
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if k != "lock"} == {
        k: v for k, v in before.items() if k != "lock"
    }


def test_empty_dataset_is_a_clear_error(tmp_path, run_cli):
    policy = write_policy(tmp_path)
    (tmp_path / "toxic.txt").write_text("\n\n\n")
    code, _, err = run_cli("train", "-p", policy, "--out", tmp_path / "run", "-q")
    assert code == 2 and "toxic.txt" in err and "Traceback" not in err


def test_resume_without_a_run_is_a_clear_error(tmp_path, run_cli):
    code, _, err = run_cli("train", "--resume", tmp_path / "nothing", "-q")
    assert code == 2 and "nothing" in err and "Traceback" not in err
