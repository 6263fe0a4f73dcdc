"""Faults mid-write and concurrent writers: a full disk, a file size limit or a read-only folder
during data synth, training and checkpointing; two processes writing one synth file or run
directory; a lock left by a killed process.

A full disk is simulated per process with RLIMIT_FSIZE (SIGXFSZ ignored, so a write past the limit
fails with EFBIG as a write to a full disk fails with ENOSPC; both take the same path in attrctl).
A read-only folder is a read-only bind mount in a private mount namespace (``unshare -m``), which
works for root too; where the machine does not allow it, those tests skip.

SIGINT/SIGTERM during ``train`` (a checkpoint is saved, exit 130, ``--resume`` continues bitwise)
is tests/test_train.py::test_sigkill_and_resume_is_bitwise_identical["SIGTERM mid fine-tune"].
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from attrctl import paths
from attrctl.errors import AttrctlError, InUseError
from attrctl.paths import PidLock

REPO = Path(__file__).resolve().parents[1]


def env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    e["PYTHONDONTWRITEBYTECODE"] = "1"  # no .pyc writes counted against the size limit
    return e


def file_size_limit(limit: int):
    """preexec_fn: writes past ``limit`` bytes fail with EFBIG instead of killing the process."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def attrctl(*args, cwd: Path, limit: int | None = None, wrap: list[str] | None = None):
    cmd = [*(wrap or []), sys.executable, "-m", "attrctl.cli", *map(str, args)]
    return subprocess.run(
        cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=600,
        preexec_fn=file_size_limit(limit) if limit else None,
    )  # fmt: skip


def clean_failure(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in:\n{proc.stderr[-3000:]}"


def snapshot(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name not in skip
    }


# ------------------------------------------------------------------------------------- synth
SYNTH_POLICY = """\
name: synth-faults
model: tiny-random
data:
  - {kind: synth, domain: toxic, samples_per_prompt: 2, max_new_tokens: 6, batch_size: 5}
attributes:
  - {name: tox, oracle: {kind: regex, patterns: ['[aeiou]']}}
"""


@pytest.fixture(scope="module")
def synth_full(tmp_path_factory):
    """The policy and an uninterrupted synth file: 2 sets × 3 prompts × 2 samples, batches of 5."""
    tmp = tmp_path_factory.mktemp("synth")
    (tmp / "p.yaml").write_text(SYNTH_POLICY)
    proc = attrctl("data", "synth", "-p", "p.yaml", "--out", "full.jsonl", "--limit", 3, "-q",
                   cwd=tmp)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return tmp / "p.yaml", (tmp / "full.jsonl").read_bytes()


@pytest.mark.slow
@pytest.mark.ci
def test_full_disk_during_synth_keeps_whole_batches_then_resumes(synth_full, tmp_path, run_cli):
    policy, full = synth_full
    lines = full.splitlines(keepends=True)
    assert len(lines) == 12
    two_batches = b"".join(lines[:10])
    part = tmp_path / "part.jsonl"
    # the third batch's append crosses the limit halfway
    proc = attrctl("data", "synth", "-p", policy, "--out", part, "--limit", 3, "-q",
                   cwd=tmp_path, limit=len(two_batches) + len(lines[10]) // 2)  # fmt: skip
    clean_failure(proc, str(part), "File too large", "What was written before is intact")
    assert part.read_bytes() == two_batches  # whole batches only: no half row, no half batch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part.jsonl"]  # no lock, no temp file
    code, _, err = run_cli("data", "synth", "-p", policy, "--out", part, "--limit", 3, "-q")
    assert code == 0, err
    assert part.read_bytes() == full  # the resumed file is the uninterrupted one


# ------------------------------------------------------------------------------------- train
def _train_policy(tmp: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from test_train import write_policy
    finally:
        sys.path.pop(0)
    return write_policy(tmp, schedule={"iterations": 1})  # top layer + norm train: ~150 KB


def _trainable_bytes() -> int:
    """Bytes of the weights that train (tiny-random's top layer and final norm, fp32)."""
    from attrctl.models import load_model

    model = load_model("tiny-random").model
    top = len(model.get_decoder().layers) - 1
    return 4 * sum(
        p.numel()
        for n, p in model.named_parameters()
        if f"layers.{top}." in n or n == "model.norm.weight"
    )


@pytest.mark.slow
@pytest.mark.ci
def test_full_disk_during_training_checkpointing_and_export_keeps_the_run(tmp_path):
    policy = _train_policy(tmp_path)
    out = tmp_path / "run"
    trainable = _trainable_bytes()

    # 1. the disk fills when S_0 is published and its plot is drawn. The limit lies between the
    #    largest file written before the plot and the plot itself, both measured here: a scratch
    #    run dies at the named point right after S_0 is published (before its plot), and the
    #    plot is then drawn from it (a fixed 60 KB, then 30 KB, broke as the plot's size changed)
    scratch = tmp_path / "scratch"
    e = {**env(), "ATTRCTL_FAULT": "publish:job=sample/0:SIGKILL"}
    cmd = [sys.executable, "-m", "attrctl.cli", "train", "-p", str(policy), "--out", str(scratch),
           "-q"]  # fmt: skip
    assert subprocess.run(cmd, cwd=tmp_path, env=e, timeout=600).returncode == -signal.SIGKILL
    written = max(p.stat().st_size for p in scratch.rglob("*") if p.is_file())
    from attrctl.train.plots import plot_run
    from attrctl.train.rundir import RunDir

    plot_run(RunDir(scratch))
    plot = (scratch / "plots" / "training.png").stat().st_size
    assert 2 * written < plot, (written, plot)  # room for a limit between the two
    proc = attrctl("train", "-p", policy, "--out", out, "-q", cwd=tmp_path,
                   limit=(written + plot) // 2)  # fmt: skip
    clean_failure(proc, str(out / "plots" / "training.png"), "File too large")
    state = json.loads((out / "state.json").read_text())["jobs"]
    assert "sample/0" in state and "fit/1" not in state
    assert not (out / "lock").exists() and not list(out.rglob("*.tmp"))
    samples = (out / "samples" / "iter_0.jsonl").read_bytes()

    # 2. resumed, the disk fills while the fine-tune's first checkpoint is saved: its weights
    #    (1×) fit under the limit, its AdamW state (2×) does not
    proc = attrctl("train", "--resume", out, "-q", cwd=tmp_path, limit=int(1.5 * trainable))
    clean_failure(proc, str(out / "checkpoints" / "finetune_1"), "File too large")
    state = json.loads((out / "state.json").read_text())["jobs"]
    assert "fit/1" in state and "finetune/1" not in state
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())
    assert not list(out.rglob("*.tmp")) and not (out / "lock").exists()
    assert (out / "samples" / "iter_0.jsonl").read_bytes() == samples
    heads = snapshot(out / "heads")
    assert heads

    # 3. resumed with space: it finishes, reusing everything published before
    proc = attrctl("train", "--resume", out, "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "state.json").read_text())["jobs"]
    assert {"sample/0", "fit/1", "finetune/1", "sample/1"} <= set(state)
    assert (out / "model" / "final" / "model.safetensors").is_file()
    assert snapshot(out / "heads") == heads
    assert (out / "samples" / "iter_0.jsonl").read_bytes() == samples
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # the steps logged before the failed checkpoint were redone, and logged once
    assert [r["step"] for r in steps if r["kind"] == "step"] == [1, 2, 3, 4, 5, 6]

    # 4. exporting the finished run onto a full disk leaves no half-exported folder (the disk
    #    fills halfway through the model's weights)
    exported = tmp_path / "exported"
    half = (out / "model" / "final" / "model.safetensors").stat().st_size // 2
    proc = attrctl("export", out, "--out", exported, cwd=tmp_path, limit=half)
    clean_failure(proc, str(exported), "File too large")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".exported", "exported"))]


# -------------------------------------------------------------------------------------- eval
@pytest.mark.slow
@pytest.mark.ci
def test_full_disk_during_eval_keeps_the_previous_result(tmp_path):
    (tmp_path / "p.txt").write_text("You are such a\nThe weather today is\n")
    result = tmp_path / "ev" / "eval.json"
    result.parent.mkdir()
    result.write_text('{"settings": {"k": 9}, "earlier": "result"}\n')
    before = result.read_bytes()
    # the new result (a few KB) replaces the earlier one; its write fails at 512 bytes
    proc = attrctl("eval", "tiny-random", "-k", "1", "--max-new-tokens", "3", "--ppl-tokens", "0",
                   "--mc-examples", "0", "--prompts", tmp_path / "p.txt", "--out", result.parent,
                   "-q", cwd=tmp_path, limit=512)  # fmt: skip
    clean_failure(proc, str(result), "File too large")
    assert result.read_bytes() == before and sorted(os.listdir(result.parent)) == ["eval.json"]


# --------------------------------------------------------------------------------- read-only
def _readonly_wrapper(folder: Path) -> list[str]:
    """A command prefix that runs the command with ``folder`` mounted read-only, in a private
    mount namespace (the rest of the machine sees no change)."""
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    user = [] if os.geteuid() == 0 else ["-r"]
    return ["unshare", "-m", *user, "--propagation", "private", "sh", "-c", script, str(folder)]


@pytest.fixture
def readonly(tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    probe = tmp_path / "probe"
    probe.mkdir()
    cmd = [*_readonly_wrapper(probe), "sh", "-c", f"! touch {probe}/x 2>/dev/null"]
    if subprocess.run(cmd, capture_output=True).returncode != 0 or (probe / "x").exists():
        pytest.skip("read-only bind mounts are not allowed here")
    return _readonly_wrapper


@pytest.mark.slow
@pytest.mark.ci
def test_read_only_folders_are_a_clear_error(synth_full, tmp_path, readonly):
    policy, full = synth_full
    # a synth file to continue, in a read-only folder
    data = tmp_path / "data"
    data.mkdir()
    (data / "s.jsonl").write_bytes(b"".join(full.splitlines(keepends=True)[:5]))
    before = snapshot(data)
    proc = attrctl("data", "synth", "-p", policy, "--out", data / "s.jsonl", "--limit", 3, "-q",
                   cwd=tmp_path, wrap=readonly(data))  # fmt: skip
    clean_failure(proc, str(data / "s.jsonl"), "Read-only file system")
    assert snapshot(data) == before
    # a run directory to resume, read-only
    run = tmp_path / "run"
    run.mkdir()
    (run / "policy.yaml").write_text(policy.read_text())
    (run / "run.json").write_text('{"policy_fingerprint": "0"}')
    before = snapshot(run)
    proc = attrctl("train", "--resume", run, "-q", cwd=tmp_path, wrap=readonly(run))
    clean_failure(proc, str(run / "lock"), "Read-only file system")
    assert snapshot(run) == before


# ------------------------------------------------------------------------------- concurrency
HOLDER = """
import sys, time
from attrctl.paths import PidLock
PidLock(sys.argv[1], "test").acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _hold(lock: Path) -> subprocess.Popen:
    """Another process holding ``lock`` (until killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE,
                            text=True, env=env())  # fmt: skip
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


RACER = """
import os, sys, time
from pathlib import Path
from attrctl.errors import InUseError
from attrctl.paths import PidLock
lock, folder, me = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
(folder / f"ready{me}").touch()
while not (folder / "go").exists():  # waiting only: nothing is decided by how long it takes
    time.sleep(0.001)
try:
    held = PidLock(lock, "thing").acquire()
except InUseError as err:
    print("refused", err, flush=True)
else:
    print("won", os.getpid(), flush=True)
    while not (folder / "release").exists():
        time.sleep(0.001)
    held.release()
"""


def _watchdog(procs: list[subprocess.Popen], seconds: float = 120.0) -> threading.Timer:
    """Kill ``procs`` after ``seconds``: a hang becomes a failure (EOF on their output), never a
    pass; nothing is decided by how long they take short of that."""
    timer = threading.Timer(seconds, lambda: [p.kill() for p in procs if p.poll() is None])
    timer.daemon = True
    timer.start()
    return timer


@pytest.mark.parametrize("round_", range(3))
def test_lock_acquisition_is_atomic(tmp_path, round_):
    """Six processes take one lock at once: exactly one gets it, and every refusal, made while the
    winner holds it, names the winner's pid (in the stale round too, where the file still names a
    dead process until the winner overwrites it)."""
    lock, n = tmp_path / "lock", 6
    if round_ == 2:  # a stale lock file from a killed process is there already
        lock.write_text("999999999\n")
    procs = [
        subprocess.Popen([sys.executable, "-c", RACER, str(lock), str(tmp_path), str(i)],
                         stdout=subprocess.PIPE, text=True, env=env())
        for i in range(n)
    ]  # fmt: skip
    timer = _watchdog(procs)
    try:
        # A bound that only turns racers that never get ready into a failure, never a pass.
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{i}").exists() for i in range(n)):
            assert all(p.poll() is None for p in procs), "a racer died before getting ready"
            assert time.monotonic() < deadline, "the racers never got ready"
            time.sleep(0.01)
        (tmp_path / "go").touch()
        firsts = [p.stdout.readline().strip() for p in procs]  # the winner holds on until release
        (tmp_path / "release").touch()
        outs = [
            (first + p.communicate(timeout=60)[0]).strip()
            for first, p in zip(firsts, procs, strict=True)
        ]
    finally:
        timer.cancel()
        for p in procs:
            if p.poll() is None:
                p.kill()
    won = [o for o in outs if o.startswith("won")]
    assert len(won) == 1, outs
    winner = won[0].split()[1]
    for o in outs:
        if not o.startswith("won"):
            assert o.startswith("refused") and f"in use by process {winner} " in o, o
    assert all(p.returncode == 0 for p in procs), outs
    assert not lock.exists()  # released by the winner


def test_lock_refusal_names_the_holder_the_kernel_reports_not_the_pid_in_the_file(tmp_path):
    """The lock file says a dead process holds it (as it does right after a killed holder's lock is
    taken over, before the new holder writes its pid); the refusal still names the live holder."""
    lock = tmp_path / "lock"
    holder = _hold(lock)
    try:
        lock.write_text("999999999\n")  # same inode, so the holder's flock stays on it
        with pytest.raises(InUseError, match=f"in use by process {holder.pid} "):
            PidLock(lock, "the thing").acquire()
    finally:
        _kill(holder)


def test_without_the_kernel_lock_table_the_pid_in_the_file_is_named_only_if_alive(
    tmp_path, monkeypatch
):
    """The fallback (no /proc/locks): the live pid in the file is named; a dead one is not."""
    monkeypatch.setattr(paths, "_flock_holder", lambda fd: None)
    lock = tmp_path / "lock"
    holder = _hold(lock)
    try:
        with pytest.raises(InUseError, match=f"in use by process {holder.pid} "):
            PidLock(lock, "the thing").acquire()
        lock.write_text("999999999\n")
        with pytest.raises(InUseError, match="in use by another process "):
            PidLock(lock, "the thing").acquire()
    finally:
        _kill(holder)


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path):
    lock = tmp_path / "lock"
    holder = _hold(lock)
    with pytest.raises(InUseError, match=f"in use by process {holder.pid} "):
        PidLock(lock, "the thing").acquire()
    _kill(holder)
    assert lock.read_text().strip() == str(holder.pid)  # a killed process leaves its lock file
    taken = PidLock(lock, "the thing").acquire()
    assert taken.stale_pid == holder.pid and lock.read_text().strip() == str(os.getpid())
    taken.release()
    assert not lock.exists()


def _fingerprint_text(policy_path: Path) -> str:
    """What `train` fingerprints a run's policy by (RunDir.claim hashes it)."""
    from attrctl.policy import load_policy
    from attrctl.train.schedules import fingerprint_text

    return fingerprint_text(load_policy(policy_path))


def test_second_writer_of_a_run_directory_is_refused_naming_the_holder(tmp_path, run_cli):
    from attrctl.train.rundir import RunDir, policy_fingerprint

    run = tmp_path / "run"
    run.mkdir()
    (run / "policy.yaml").write_text(SYNTH_POLICY)
    text = _fingerprint_text(run / "policy.yaml")
    (run / "run.json").write_text(json.dumps({"policy_fingerprint": policy_fingerprint(text)}))
    holder = _hold(run / "lock")
    code, _, err = run_cli("train", "--resume", run, "-q")
    assert code == 2 and "Traceback" not in err
    assert f"{run} is in use by process {holder.pid} (lock file {run / 'lock'})" in err
    _kill(holder)
    rd = RunDir(run)
    rd.claim(text, resume=True)  # the dead holder's lock is taken over
    assert (run / "lock").read_text().strip() == str(os.getpid())
    rd.release()
    assert not (run / "lock").exists()


def test_second_writer_of_a_synth_file_is_refused_naming_the_holder(tmp_path, run_cli):
    (tmp_path / "p.yaml").write_text(SYNTH_POLICY)
    out = tmp_path / "s.jsonl"
    holder = _hold(tmp_path / "s.jsonl.lock")
    code, _, err = run_cli("data", "synth", "-p", tmp_path / "p.yaml", "--out", out, "-q")
    assert code == 2 and "Traceback" not in err
    assert f"{out} is in use by process {holder.pid}" in err and not out.exists()
    _kill(holder)
    code, _, err = run_cli("data", "synth", "-p", tmp_path / "p.yaml", "--out", out, "--limit",
                           1, "-q")  # fmt: skip
    assert code == 0, err
    assert len(out.read_text().splitlines()) == 4 and not (tmp_path / "s.jsonl.lock").exists()


@pytest.mark.slow
@pytest.mark.ci
def test_two_synth_processes_on_one_file(synth_full, tmp_path):
    """Two real `data synth` processes at once: each ends in success or in a refusal naming the
    other; the file ends complete, every row once, as one uninterrupted run writes it."""
    policy, full = synth_full
    out = tmp_path / "s.jsonl"
    cmd = [sys.executable, "-m", "attrctl.cli", "data", "synth", "-p", str(policy), "--out",
           str(out), "--limit", "3", "-q"]  # fmt: skip
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    results = [(p.pid, *p.communicate(timeout=600), p.returncode) for p in procs]
    for pid, _, err, code in results:
        assert code in (0, 2) and "Traceback" not in err, err
        if code == 2:
            other = next(q for q, *_ in results if q != pid)
            assert f"in use by process {other}" in err, err
    assert any(code == 0 for *_, code in results)
    if out.read_bytes() != full:  # the refused one may have been first: run it again
        assert subprocess.run(cmd, cwd=tmp_path, env=env()).returncode == 0
    assert out.read_bytes() == full


# -------------------------------------------------------------------------- unsafe pickle loads
_UNSAFE = [
    re.compile(r"\bpickle\.loads?\("),
    re.compile(r"\b(c?[Pp]ickle|dill|joblib|cloudpickle)\.load\("),
    re.compile(r"\bread_pickle\("),
    re.compile(r"allow_pickle\s*=\s*True"),
    re.compile(r"\btorch\.load\((?![^)]*weights_only\s*=\s*True)"),
]


def test_no_pickle_or_torch_load_without_weights_only():
    """docs/design.md, "Rules": weights load from safetensors or with weights_only=True; no bare
    pickle. (The jigsaw judge's tokenizer pickle goes through an allow-listing Unpickler, named in
    docs/reliability.md with the third-party pickle loads attrctl accepts.)"""
    me = Path(__file__).resolve()
    offenders = []
    for folder in ("attrctl", "cli", "kernels", "benchmarks", "scripts", "tests"):
        for path in (REPO / folder).rglob("*.py"):
            if path.resolve() == me:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            for pattern in _UNSAFE:
                for m in pattern.finditer(text):
                    line = text.count("\n", 0, m.start()) + 1
                    offenders.append(f"{path.relative_to(REPO)}:{line}: {m.group(0)}")
    assert not offenders, "unsafe loads:\n" + "\n".join(offenders)


def test_the_grep_catches_what_it_should():
    bad = ["pickle.load(fh)", "pickle.loads(b)", "torch.load(p)", "torch.load(p, map_location='cpu')",
           "joblib.load(f)", "np.load(f, allow_pickle=True)", "pd.read_pickle(f)"]  # fmt: skip
    good = ["torch.load(p, weights_only=True)", "torch.load(p, map_location='cpu', weights_only=True)",
            "json.load(fh)", "load_file(p)"]  # fmt: skip
    assert all(any(p.search(s) for p in _UNSAFE) for s in bad)
    assert not any(p.search(s) for p in _UNSAFE for s in good)


# ------------------------------------------------------------------------- the writers themselves
def test_atomic_dir_keeps_the_old_folder_when_the_new_one_fails(tmp_path):
    from attrctl.paths import atomic_dir

    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
        raise RuntimeError("killed mid-write")
    assert (target / "a").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["ckpt"]
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
    assert (target / "a").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_a_metrics_line_cut_by_a_kill_does_not_swallow_the_next(tmp_path):
    from attrctl.train.rundir import RunDir

    run = RunDir(tmp_path)
    run.log({"kind": "step", "step": 1})
    with run.metrics.open("ab") as fh:
        fh.write(b'{"kind": "step", "st')  # killed mid-line
    run.log({"kind": "step", "step": 2})
    assert [r["step"] for r in run.read_metrics()] == [1, 2]


def test_write_errors_name_the_file_in_process(tmp_path):
    """In-process check of the conversion (the subprocess tests above check the CLI)."""
    from attrctl.paths import atomic_write

    pid = os.fork()
    if pid == 0:  # child: a 100-byte file size limit, then one atomic write too big for it
        code = 1
        try:
            file_size_limit(100)()
            with atomic_write(tmp_path / "x.json") as fh:
                fh.write("y" * 1000)
        except AttrctlError as err:
            ok = str(tmp_path / "x.json") in str(err) and "File too large" in str(err)
            code = 0 if ok and not list(tmp_path.iterdir()) else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
