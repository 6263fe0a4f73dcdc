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
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import set_fields

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
    set_fields(policy, extra)
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(policy))  # JSON is YAML
    return path


def free_port() -> str:
    """A TCP port no one listens on now, for torchrun's rendezvous: a fixed port collides when two
    suites (or two torchrun tests) run on one machine at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    return e


def train_two_ranks(tmp: Path, policy: Path) -> Path:
    """`attrctl train` of ``policy`` under torchrun with 2 gloo ranks, into ``tmp/run``."""
    out = tmp / "run"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", free_port(), "-m", "attrctl.cli",
           "train", "-p", str(policy), "--out", str(out), "-q"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


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


def run_with_fault(policy: Path, out: Path, cwd: Path, spec: str, **fault_env: str):
    """`attrctl train` with ``ATTRCTL_FAULT`` set: the run stops, dies or waits at that named
    point of its own code (attrctl/faults.py), whatever the machine's speed."""
    e = env()
    e.update({"ATTRCTL_FAULT": spec, **fault_env})
    cmd = [sys.executable, "-m", "attrctl.cli", "train", "-p", str(policy), "--out", str(out), "-q"]
    return subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=600)


def _kl_by_job(run: Path) -> dict[str, list[float]]:
    kl: dict[str, list[float]] = {}
    for r in _steps(run):
        kl.setdefault(r["job"], []).append(r["kl"])
    return kl


# An attribute the tiny model's samples violate about half the time (profanity_check flags none of
# its byte soup, so heads fitted under it stay near zero and regularize nothing measurable), and a
# head learning rate that fits it in two epochs: θ trains with KL ≈ 3e-4–5e-4 (measured).
SIGNAL = {
    "attributes": [{"name": "letter_o", "oracle": {"kind": "regex", "patterns": ["o"]},
                    "head": {"kind": "linear", "rank": 8}}],
    "regularizer": {"prompts": ["prompts.txt"], "samples_per_prompt": 3, "max_new_tokens": 6,
                    "epochs": 2, "batch_size": 4, "learning_rate": 0.05},
}  # fmt: skip


@pytest.mark.ci
@pytest.mark.slow
def test_parallel_roles_run_at_once_and_heads_lag_one_iteration(tmp_path):
    """Each role of an iteration waits at its start until the other two have arrived (a barrier at
    the named point ``parallel/<i>``): a schedule that ran them one after another would stop at
    the first role's barrier and fail after ATTRCTL_FAULT_TIMEOUT instead of passing."""
    policy = write_policy(tmp_path, schedule={"mode": "parallel", "iterations": 3}, **SIGNAL)
    rooms = tmp_path / "barrier"
    spec = ",".join(f"parallel/{i}:barrier=3" for i in (1, 2, 3))
    proc = run_with_fault(policy, tmp_path / "run", tmp_path, spec,
                          ATTRCTL_FAULT_DIR=str(rooms), ATTRCTL_FAULT_TIMEOUT="300")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i in (1, 2, 3):  # all three roles of every iteration were alive at the same time
        arrived = sorted(p.name.split(".")[0] for p in (rooms / f"parallel_{i}").iterdir())
        assert arrived == ["role-finetune", "role-fit", "role-sample"], (i, arrived)
    assert "critical path" in proc.stdout
    state = json.loads((tmp_path / "run" / "state.json").read_text())["jobs"]
    # parallel: fit R_i on S_{i−2}, fine-tune θ_i with R_{i−1}; R_1 has no samples (zero head)
    assert not state["fit/1"]["fitted"]
    assert state["fit/2"]["samples"] == 0 and state["fit/3"]["samples"] == 1
    assert [state[f"finetune/{i}"]["heads"] for i in (1, 2, 3)] == [0, 1, 2]
    # Zero heads give q = p: θ_1 and θ_2 train with KL at rounding level (~1e-8); θ_3 trains
    # with R_2, fitted on S_0, at the KL of a fitted head (~3e-4). A parallel run whose
    # fine-tune used no heads, or the zero head, fails here.
    kl = _kl_by_job(tmp_path / "run")
    unregularized = max(abs(x) for x in kl["finetune/1"] + kl["finetune/2"])
    fitted = min(kl["finetune/3"])
    assert unregularized < 1e-6 and fitted > 1e-4, (unregularized, fitted)


@pytest.mark.ci
@pytest.mark.slow
def test_a_failed_parallel_role_keeps_the_roles_that_finished(tmp_path):
    policy = write_policy(tmp_path, schedule={"mode": "parallel", "iterations": 3})
    out = tmp_path / "run"
    proc = run_with_fault(policy, out, tmp_path, "parallel/1:role=fit:exit=3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "fit_1 (exit 3)" in proc.stderr and "--resume" in proc.stderr
    state = json.loads((out / "state.json").read_text())["jobs"]
    assert "sample/0" in state and "finetune/1" in state and "fit/1" not in state
    attrctl("train", "--resume", out, "-q", cwd=tmp_path)
    steps = [(r["job"], r["step"]) for r in _steps(out)]
    assert steps == [(f"finetune/{i}", s) for i in (1, 2, 3) for s in range(1, 7)]  # none redone


def _state(run: Path) -> dict:
    return json.loads((run / "state.json").read_text())["jobs"]


# Each moment is a named point of the product (attrctl/faults.py) where the run kills or signals
# itself, so the same moment is hit on any machine:
KILL_POINTS = {
    # mid fine-tune of θ_2, right after its step-2 checkpoint
    "fine-tune checkpoint": ("finetune/2:step=2:SIGKILL", -signal.SIGKILL),
    # while R_2 is being fitted (after its first optimizer step)
    "fitting": ("fit/2:step=1:SIGKILL", -signal.SIGKILL),
    # SIGTERM at the end of θ_1's step 1: a checkpoint at step 1, exit 130
    "SIGTERM mid fine-tune": ("finetune/1:step=1:SIGTERM", 130),
    # SIGTERM during θ_1's last step: θ_1 is kept and published, the run stops before sampling
    "SIGTERM in the last step": ("finetune/1:step=6:SIGTERM", 130),
}


@pytest.mark.ci
@pytest.mark.slow
@pytest.mark.parametrize("moment", list(KILL_POINTS))
def test_sigkill_and_resume_is_bitwise_identical(reference_run, tmp_path, moment):
    ref, _ = reference_run
    # checkpoints do not change the computation: with none on schedule, SIGTERM's is the only one
    extra = {"finetune__checkpoint_every": 100} if moment.startswith("SIGTERM") else {}
    policy = write_policy(tmp_path, **extra)
    out = tmp_path / "run"
    spec, code = KILL_POINTS[moment]
    proc = run_with_fault(policy, out, tmp_path, spec)
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    state = _state(out)
    if moment == "fine-tune checkpoint":
        ckpt = json.loads((out / "checkpoints" / "finetune_2" / "state.json").read_text())
        assert ckpt["step"] == 2 and "fit/2" in state and "finetune/2" not in state
        assert (out / "lock").exists()  # the killed process never released it
    elif moment == "fitting":
        assert "sample/1" in state and "fit/2" not in state
        assert not (out / "heads" / "iter_2").exists()  # killed inside the fit, before publishing
    elif moment == "SIGTERM mid fine-tune":
        ckpt = json.loads((out / "checkpoints" / "finetune_1" / "state.json").read_text())
        assert ckpt["step"] == 1 and "finetune/1" not in state
        assert "stopped at step 1/6" in proc.stderr and not (out / "lock").exists()
    else:  # the request is honoured at the job boundary, not carried into θ_2 (which it once
        # stopped after one step) and not lost: no sampling with θ_1 after the signal
        assert "finetune/1" in state and "sample/1" not in state
        assert "stopped after finetune/1" in proc.stderr and not (out / "lock").exists()
        assert not (out / "checkpoints" / "finetune_1").exists()
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


@pytest.mark.ci
@pytest.mark.slow
def test_torchrun_two_ranks_matches_one_process(reference_run, tmp_path):
    ref, _ = reference_run
    policy = write_policy(tmp_path)
    out = train_two_ranks(tmp_path, policy)
    # Same rows, same draws: sampled continuations match row for row (per-row seeds); the fit
    # shares every global batch among the ranks without losing a sequence (the fine-tune's batch
    # size is a multiple of the ranks), each rank scales its row sum by the global batch's rows
    # and DDP averages the gradients; the fit's consistency rows are the draws one process
    # makes. What differs is the order of fp32 sums (~1e-7 relative each; batch shapes and the
    # all-reduce group terms differently), and AdamW's per-coordinate normalisation turns
    # rounding in tiny, cancelling gradients into steps of that coordinate's size, so the
    # tolerances below are measured, not ~1e-7.
    rows_ref = (ref / "samples" / "iter_0.jsonl").read_text().splitlines()
    rows_ddp = (out / "samples" / "iter_0.jsonl").read_text().splitlines()
    assert [json.loads(r)["continuation"] for r in rows_ref] == [
        json.loads(r)["continuation"] for r in rows_ddp
    ]
    # The fitted heads, R_1 on S_0 and R_2 on S_1 (features from θ_1): per tensor |Δ|/|R|
    # measured ≤ 7.2e-5 for R_1 and ≤ 4.8e-4 for R_2 (one process at 2 threads instead of 1:
    # ≤ 1.3e-5 and ≤ 2.7e-4, the same rounding). A fault moves some tensor of each head by
    # ≥ 5e-2 (measured by patching the 2-rank run): the fit's gradients not all-reduced
    # 0.66 / 0.68, consistency rows drawn per rank 0.078 / 0.051, and the fit of earlier
    # versions (11 training sequences cut to 10 on 2 ranks, rows drawn per rank) 0.24 / 0.41.
    # 3e-3 sits ≥ 6× above the rounding and ≥ 17× below the faults.
    for i in (1, 2):
        h_ref = load_file(str(ref / "heads" / f"iter_{i}" / "heads.safetensors"))
        h_ddp = load_file(str(out / "heads" / f"iter_{i}" / "heads.safetensors"))
        assert h_ref.keys() == h_ddp.keys()
        for k, v in h_ref.items():
            assert v.norm() > 0, f"heads/iter_{i} {k} was not fitted"
            rel = float((v - h_ddp[k]).norm() / v.norm())
            print(f"heads/iter_{i} {k}: |2-rank − 1-process| / |1-process| = {rel:.2e}")
            assert rel < 3e-3, f"heads/iter_{i} {k}: 2-rank head differs by {rel:.2e}"
    # θ_2, trained with those heads: the 2-rank update differs from the 1-process one by
    # 0.001% of its norm (0.26% when the heads differed as in earlier versions); < 0.1%. The
    # per-step CE agrees to 1e-5.
    base = _tiny_params()
    a, b = weights(ref), weights(out)
    diff = sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5
    update = sum(((a[k] - base[k]) ** 2).sum() for k in a) ** 0.5
    print(f"θ_2: |2-rank − 1-process| / |update| = {diff / update:.3%}")
    assert diff / update < 1e-3, f"2-rank vs 1-process update differs by {diff / update:.3%}"
    ce = [[r["ce"] for r in _steps(run)] for run in (ref, out)]
    assert len(ce[0]) == len(ce[1]) == 12
    assert max(abs(x - y) for x, y in zip(*ce, strict=True)) < 1e-5


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


def _snapshot(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and str(p.relative_to(folder)) not in skip
    }


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
    policy = write_policy(tmp_path)
    out = tmp_path / "run"
    proc = run_with_fault(policy, out, tmp_path, "finetune/1:step=2:SIGKILL")  # θ_1's checkpoint
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpt = out / "checkpoints" / "finetune_1"
    if damage == "corrupt":
        data = (ckpt / "trainable.safetensors").read_bytes()
        (ckpt / "trainable.safetensors").write_bytes(data[: len(data) // 2])
    else:
        (ckpt / "optimizer.safetensors").unlink()
    before = _snapshot(out, skip=("lock",))
    res = attrctl("train", "--resume", out, "-q", cwd=tmp_path, check=False)
    _no_traceback(res)
    assert str(ckpt) in res.stderr
    assert _snapshot(out, skip=("lock",)) == before


def test_empty_dataset_is_a_clear_error(tmp_path, run_cli):
    policy = write_policy(tmp_path)
    (tmp_path / "toxic.txt").write_text("\n\n\n")
    code, _, err = run_cli("train", "-p", policy, "--out", tmp_path / "run", "-q")
    assert code == 2 and "toxic.txt" in err and "Traceback" not in err


def test_resume_without_a_run_is_a_clear_error(tmp_path, run_cli):
    code, _, err = run_cli("train", "--resume", tmp_path / "nothing", "-q")
    assert code == 2 and "nothing" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ resume and flags
def test_train_without_a_policy_asks_for_one(run_cli):
    code, _, err = run_cli("train")  # once started a 10–17 minute run of the default policy
    assert code == 2 and "--policy" in err and "--resume" in err and "Traceback" not in err


def test_resume_refuses_the_flags_it_would_ignore(reference_run, tmp_path, run_cli):
    ref, _ = reference_run
    before = _snapshot(ref)
    for args, needle in [
        (["-p", "toxicity"], "-p/--policy does not apply"),
        (["--out", tmp_path / "elsewhere"], "--out does not apply"),
        (["--set", "seed=7"], "--set seed=7: a resumed run keeps its policy"),
    ]:
        code, _, err = run_cli("train", "--resume", ref, *args, "-q")
        assert code == 2 and needle in err, err
    assert _snapshot(ref) == before and not (tmp_path / "elsewhere").exists()


def test_parallel_schedule_needs_three_iterations(tmp_path, run_cli):
    policy = write_policy(tmp_path, schedule={"mode": "parallel", "iterations": 2})
    code, _, err = run_cli("policy", "validate", policy)
    assert code == 2 and "schedule.iterations ≥ 3" in err and "no regularizer" in err
    # the baselines have no heads, so for them the mode does not matter
    sft = write_policy(tmp_path, name="sft", schedule={"mode": "parallel", "iterations": 2},
                       finetune__objective="sft")  # fmt: skip
    assert run_cli("policy", "validate", sft)[0] == 0


@pytest.mark.ci
@pytest.mark.slow
def test_resume_extends_a_finished_run_with_more_iterations(reference_run, tmp_path):
    ref, _ = reference_run
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    proc = attrctl("train", "--resume", run, "--set", "schedule.iterations=3", "-q", cwd=tmp_path)
    state = _state(run)
    assert state["finetune/3"]["heads"] == 3 and state["fit/3"]["samples"] == 2
    assert state["final"]["iteration"] == 3 and "sample/3" in state
    for job in ("fit/2", "finetune/2", "sample/2"):  # the first two iterations were kept
        assert state[job] == _state(ref)[job], job
    assert [r["step"] for r in _steps(run)] == [1, 2, 3, 4, 5, 6] * 3
    # model/final is θ_3 now (it held θ_2): its top layer equals iter_3's trainable tensors
    final = load_file(str(run / "model" / "final" / "model.safetensors"))
    theta3, theta2 = weights(run, "iter_3"), weights(ref)
    assert theta3.keys() <= final.keys()
    assert all(torch.equal(final[k], v) for k, v in theta3.items())
    assert any(not torch.equal(final[k], v) for k, v in theta2.items())
    assert "model/final" in proc.stdout
    # fewer iterations than trained would drop some: refused, nothing changed
    before = _snapshot(run, skip=("lock",))
    res = attrctl("train", "--resume", run, "--set", "schedule.iterations=2", "-q",
                  cwd=tmp_path, check=False)  # fmt: skip
    _no_traceback(res)
    assert "has trained 3 iterations" in res.stderr
    assert _snapshot(run, skip=("lock",)) == before


@pytest.mark.ci
@pytest.mark.slow
def test_torchrun_fsdp_two_ranks_matches_one_process(reference_run, tmp_path):
    """finetune.sharding fsdp: FSDP2 shards each decoder layer over 2 gloo ranks, rank 0 writes
    the gathered weights; the run matches the 1-process one as the DDP run does (same data,
    heads and steps; only the order of fp32 sums differs), and model/iter_2 holds whole
    (gathered) tensors."""
    ref, _ = reference_run
    policy = write_policy(tmp_path, finetune__sharding="fsdp")
    out = train_two_ranks(tmp_path, policy)
    base = _tiny_params()
    a, b = weights(ref), weights(out)
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)  # whole tensors
    diff = sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5
    update = sum(((a[k] - base[k]) ** 2).sum() for k in a) ** 0.5
    print(f"θ_2 (FSDP): |2-rank − 1-process| / |update| = {diff / update:.3%}")
    assert diff / update < 1e-3, f"FSDP vs 1-process update differs by {diff / update:.3%}"
    ce = [[r["ce"] for r in _steps(run)] for run in (ref, out)]
    assert max(abs(x - y) for x, y in zip(*ce, strict=True)) < 1e-5
    norms = [[r["grad_norm"] for r in _steps(run)] for run in (ref, out)]
    assert max(abs(x - y) / x for x, y in zip(*norms, strict=True)) < 1e-4  # one clip norm
