"""The run directory: everything a training run writes, written atomically, and how it resumes.

Layout (``runs/<policy>/`` by default)::

    policy.yaml                  the resolved policy (every default filled in)
    run.json                     policy fingerprint, seed, threads, attrctl/torch versions
    state.json                   the manifest: every published job and its outputs (written last)
    lock                         pid of the process writing here (refuses a second writer)
    samples/iter_<i>.jsonl       S_i: continuations of the regularizer prompts from θ_i, labelled
    heads/iter_<i>/              R_i: heads.safetensors + heads.json (spec, tap, fit metrics)
    model/iter_<i>/              θ_i: trainable.safetensors (the weights that train; the rest is
                                 the base model)
    model/final/                 the last θ as a transformers folder (save_pretrained, safetensors)
    checkpoints/finetune_<i>/    the running fine-tune's last checkpoint: weights, optimizer, RNG,
                                 step and data position
    metrics.jsonl                one JSON record per step and per job
    plots/training.png           curves, redrawn after every iteration

A job publishes its output folder or file first (built under a temporary name, then renamed) and
the manifest last, so a reader — another role process, a resumed run — never sees half an output:
what is not in ``state.json`` does not exist. Resuming reruns the schedule and skips every job the
manifest lists; an unfinished fine-tune continues from its checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attrctl.errors import AttrctlError
from attrctl.paths import atomic_write

STATE_VERSION = 1


def policy_fingerprint(policy_yaml: str) -> str:
    """A short hash of the resolved policy: two runs with the same fingerprint train alike."""
    return hashlib.sha256(policy_yaml.encode()).hexdigest()[:16]


def write_json(path: Path, data: Any) -> None:
    with atomic_write(path) as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AttrctlError(f"{path}: {what} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AttrctlError(f"{path}: {what} is corrupt ({err})") from None


class RunDir:
    """Paths, manifest and atomic writes of one run directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # ---------------------------------------------------------------------------- paths
    def samples(self, i: int) -> Path:
        return self.root / "samples" / f"iter_{i}.jsonl"

    def heads(self, i: int) -> Path:
        return self.root / "heads" / f"iter_{i}"

    def model(self, i: int | str) -> Path:
        return self.root / "model" / (f"iter_{i}" if isinstance(i, int) else i)

    def checkpoint(self, i: int) -> Path:
        return self.root / "checkpoints" / f"finetune_{i}"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    # ---------------------------------------------------------------------------- manifest
    def state(self) -> dict[str, Any]:
        if not self.state_path.exists():
            return {"version": STATE_VERSION, "jobs": {}}
        state = read_json(self.state_path, "the run manifest")
        if not isinstance(state, dict) or not isinstance(state.get("jobs"), dict):
            raise AttrctlError(f"{self.state_path}: the run manifest is corrupt (no 'jobs')")
        return state

    def done(self, job: str) -> dict[str, Any] | None:
        """The manifest record of a published job, or None."""
        return self.state()["jobs"].get(job)

    def publish(self, job: str, record: dict[str, Any]) -> None:
        """Add a job to the manifest (its outputs must already be in place)."""
        state = self.state()
        state["jobs"][job] = record
        write_json(self.state_path, state)

    # ---------------------------------------------------------------------------- metrics
    def log(self, record: dict[str, Any]) -> None:
        """Append one metrics record (fsynced: a killed run keeps every line it logged)."""
        self.metrics.parent.mkdir(parents=True, exist_ok=True)
        with self.metrics.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        out = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    out.append(rec)
        return out

    def drop_metrics_after(self, job: str, step: int) -> None:
        """Forget step records of ``job`` past ``step`` (logged after the checkpoint a resumed
        run restarts from; the resumed run logs them again)."""
        if not self.metrics.exists():
            return
        keep = [
            r
            for r in self.read_metrics()
            if not (r.get("job") == job and r.get("kind") == "step" and r.get("step", 0) > step)
        ]
        with atomic_write(self.metrics) as fh:
            fh.writelines(json.dumps(r, sort_keys=True) + "\n" for r in keep)

    # ---------------------------------------------------------------------------- ownership
    def claim(self, policy_yaml: str, *, resume: bool, meta: dict | None = None) -> None:
        """Take the directory for this policy, or refuse (another policy's run, a live writer).

        A fresh run into a folder that already holds a run of the *same* policy continues it
        (as ``--resume`` would); one that holds another policy's run is refused untouched.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fp = policy_fingerprint(policy_yaml)
        run_json = self.root / "run.json"
        if run_json.exists():
            info = read_json(run_json, "run.json")
            theirs = info.get("policy_fingerprint") if isinstance(info, dict) else None
            if theirs != fp:
                name = info.get("policy_name", "?") if isinstance(info, dict) else "?"
                raise AttrctlError(
                    f"{self.root} holds a run of another policy ({name!r}, fingerprint {theirs}; "
                    f"this one is {fp}). Nothing was changed: pass another --out, or delete the "
                    "folder to start over"
                )
        elif resume:
            raise AttrctlError(f"{self.root}: no run to resume here (run.json is missing)")
        elif any(p.name not in ("lock", "data") for p in self.root.iterdir()):
            raise AttrctlError(
                f"{self.root} is not empty and holds no attrctl run; nothing was changed: pass "
                "another --out"
            )
        self._lock()
        if not run_json.exists():
            write_json(run_json, {"policy_fingerprint": fp, **(meta or {})})

    def _lock(self) -> None:
        lock = self.root / "lock"
        if lock.exists():
            try:
                pid = int(lock.read_text().strip() or 0)
            except (ValueError, OSError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise AttrctlError(
                    f"{self.root} is in use by process {pid} (lock file {lock}); wait for it or "
                    "stop it"
                )
        with atomic_write(lock) as fh:
            fh.write(f"{os.getpid()}\n")

    def release(self) -> None:
        lock = self.root / "lock"
        with contextlib.suppress(OSError, ValueError):
            if int(lock.read_text().strip()) == os.getpid():
                lock.unlink()


@dataclass(frozen=True)
class FinishedRun:
    """A finished training run, as ``eval``, ``export``, ``generate`` and ``report`` read it.

    Attributes:
        root: the run directory.
        policy_path: its resolved ``policy.yaml``.
        model_dir: ``model/final``, a transformers folder.
        heads_dir: the last fitted heads (``heads/iter_<i>``), or None when no head was fitted.
        state: the manifest (``state.json``).
    """

    root: Path
    policy_path: Path
    model_dir: Path
    heads_dir: Path | None
    state: dict[str, Any]

    def policy(self, overrides=()):
        """The run's resolved policy (``overrides`` as ``--set`` gives them)."""
        from attrctl.policy import load_policy

        return load_policy(self.policy_path, overrides)


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a training run (its ``run.json`` exists)."""
    return (Path(path) / "run.json").is_file()


def open_finished_run(path: str | os.PathLike) -> FinishedRun:
    """The finished run in ``path``, or a clear error saying what is missing.

    Raises:
        AttrctlError: not a run directory, the manifest is corrupt, or the run has no final
            model yet (it is unfinished: ``attrctl train --resume`` completes it).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise AttrctlError(f"{root}: no such run directory")
    if not is_run_dir(root):
        raise AttrctlError(f"{root}: not an attrctl run directory (run.json is missing)")
    run = RunDir(root)
    state = run.state()
    final = run.model("final")
    if not (final / "config.json").is_file() or not (root / "policy.yaml").is_file():
        raise AttrctlError(
            f"{root}: the run has no finished model (model/final is missing); finish it with: "
            f"attrctl train --resume {root}"
        )
    fitted = [
        rec.get("iteration", int(job.split("/")[1]))
        for job, rec in state["jobs"].items()
        if job.startswith("fit/") and isinstance(rec, dict) and rec.get("fitted")
    ]
    heads = run.heads(max(fitted)) if fitted else None
    if heads is not None and not (heads / "heads.safetensors").is_file():
        raise AttrctlError(f"{heads}: the manifest lists these heads but their weights are missing")
    return FinishedRun(root, root / "policy.yaml", final, heads, state)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
