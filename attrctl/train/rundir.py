"""The run directory: everything a training run writes, written atomically, and how it resumes.

Layout (``runs/<policy>/`` by default)::

    policy.yaml                  the resolved policy (every default filled in)
    run.json                     policy fingerprint, seed, threads, attrctl/torch versions
    state.json                   the manifest: every published job and its outputs (written last)
    lock                         pid of the process writing here, flock-ed by it (refuses a
                                 second writer; a killed writer's lock is taken over)
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
from attrctl.paths import PidLock, append_durably, atomic_write, writing

STATE_VERSION = 1


def policy_fingerprint(policy_yaml: str) -> str:
    """A short hash of the resolved policy: two runs with the same fingerprint train alike."""
    return hashlib.sha256(policy_yaml.encode()).hexdigest()[:16]


def write_json(path: Path, data: Any) -> None:
    with atomic_write(path) as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")


MAX_JSON_BYTES = 64 * 2**20  # run.json / state.json are a few KiB; a bigger one is not ours


def read_json(path: Path, what: str) -> Any:
    """A small JSON file of a run directory, or an error naming it (missing, unreadable, too big,
    not UTF-8, not JSON, nested too deeply)."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise AttrctlError(f"{path}: {what} is missing") from None
    except OSError as err:
        raise AttrctlError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    if len(raw) > MAX_JSON_BYTES:
        raise AttrctlError(f"{path}: {what} is corrupt (larger than {MAX_JSON_BYTES >> 20} MiB)")
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        # ValueError: JSONDecodeError, and ints past Python's digit limit
        raise AttrctlError(f"{path}: {what} is corrupt ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text.splitlines()[0][:200]


class RunDir:
    """Paths, manifest and atomic writes of one run directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._lock_handle: PidLock | None = None

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
        version = state.get("version", STATE_VERSION)
        if version != STATE_VERSION:
            raise AttrctlError(
                f"{self.state_path}: the run manifest has format version {version!r}; this "
                f"attrctl reads version {STATE_VERSION} (was the run made by another attrctl "
                "version?)"
            )
        bad = [job for job, rec in state["jobs"].items() if not isinstance(rec, dict)]
        if bad:
            raise AttrctlError(
                f"{self.state_path}: the run manifest is corrupt (job {bad[0]!r} is not a record)"
            )
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
        """Append one metrics record (fsynced: a killed run keeps every line it logged). A line
        cut short by a kill stays a line of its own (skipped when read) instead of swallowing the
        next record."""
        line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
        with writing(self.metrics):
            self.metrics.parent.mkdir(parents=True, exist_ok=True)
            fh = self.metrics.open("a+b", buffering=0)  # a+: pread needs read access
        with fh:
            size = os.fstat(fh.fileno()).st_size
            if size and os.pread(fh.fileno(), 1, size - 1) != b"\n":
                line = b"\n" + line
            append_durably(fh, self.metrics, line)

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every record of ``metrics.jsonl``; a line that is not a JSON object (cut short by a
        kill, damaged) is skipped."""
        try:
            raw = self.metrics.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as err:
            raise AttrctlError(f"{self.metrics}: cannot read ({err.strerror or err})") from None
        out = []
        for line in raw.splitlines():
            with contextlib.suppress(ValueError, UnicodeDecodeError, RecursionError):
                rec = json.loads(line.decode("utf-8"))
                if isinstance(rec, dict):
                    out.append(rec)
        return out

    def drop_metrics_after(self, job: str, step: int) -> None:
        """Forget step records of ``job`` past ``step`` (logged after the checkpoint a resumed
        run restarts from — or by a run stopped before its first checkpoint, ``step`` 0; the
        resumed run logs them again). Rewrites the file only when there is something to drop."""
        if not self.metrics.exists():
            return
        records = self.read_metrics()
        keep = [r for r in records if not _after(r, job, step)]
        if len(keep) == len(records):
            return
        with atomic_write(self.metrics) as fh:
            fh.writelines(json.dumps(r, sort_keys=True) + "\n" for r in keep)

    # ---------------------------------------------------------------------------- ownership
    def claim(
        self, policy_yaml: str, *, resume: bool, meta: dict | None = None, legacy: str | None = None
    ) -> None:
        """Take the directory for this policy, or refuse (another policy's run, a live writer).

        A fresh run into a folder that already holds a run of the *same* policy continues it
        (as ``--resume`` would); one that holds another policy's run is refused untouched.
        ``legacy``: the policy as an earlier attrctl fingerprinted it; a run recorded under it is
        the same run, and its run.json is brought up to date.
        """
        if self.root.exists() and not self.root.is_dir():
            raise AttrctlError(f"{self.root}: not a folder; pass another --out")
        with writing(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
        fp = policy_fingerprint(policy_yaml)
        run_json = self.root / "run.json"
        if not run_json.exists():
            if resume:
                raise AttrctlError(f"{self.root}: no run to resume here (run.json is missing)")
            if any(p.name not in ("lock", "data") for p in self.root.iterdir()):
                raise AttrctlError(
                    f"{self.root} is not empty and holds no attrctl run; nothing was changed: "
                    "pass another --out"
                )
        # One writer at a time: the lock is taken atomically (flock) before anything is written
        # and before the run is read for real, so two `train` processes cannot both pass.
        self._lock()
        try:
            if run_json.exists():
                info = read_json(run_json, "run.json")
                theirs = info.get("policy_fingerprint") if isinstance(info, dict) else None
                if legacy is not None and theirs == policy_fingerprint(legacy) != fp:
                    write_json(run_json, {**info, "policy_fingerprint": fp})
                    theirs = fp
                if theirs != fp:
                    name = info.get("policy_name", "?") if isinstance(info, dict) else "?"
                    raise AttrctlError(
                        f"{self.root} holds a run of another policy ({name!r}, fingerprint "
                        f"{theirs}; this one is {fp}). Nothing was changed: pass another --out, "
                        "or delete the folder to start over"
                    )
            else:
                write_json(run_json, {"policy_fingerprint": fp, **(meta or {})})
        except BaseException:
            self.release()
            raise

    def _lock(self) -> None:
        """Take ``<root>/lock`` (see :class:`attrctl.paths.PidLock`): refuses while another live
        process holds it, naming its pid; a lock left by a killed process is taken over."""
        if self._lock_handle is None:
            self._lock_handle = PidLock(self.root / "lock", what=str(self.root))
        self._lock_handle.acquire()

    def release(self) -> None:
        """Give the directory up (deletes the lock file). Idempotent."""
        if self._lock_handle is not None:
            self._lock_handle.release()


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
        _iteration(job, rec)
        for job, rec in state["jobs"].items()
        if job.startswith("fit/") and rec.get("fitted")
    ]
    if None in fitted:
        raise AttrctlError(f"{run.state_path}: the run manifest is corrupt (a fit job's iteration)")
    heads = run.heads(max(fitted)) if fitted else None
    if heads is not None and not (heads / "heads.safetensors").is_file():
        raise AttrctlError(f"{heads}: the manifest lists these heads but their weights are missing")
    return FinishedRun(root, root / "policy.yaml", final, heads, state)


def _iteration(job: str, rec: dict[str, Any]) -> int | None:
    """The iteration of a manifest record (``fit/2`` → 2), or None when it is not a count."""
    value = rec.get("iteration", job.partition("/")[2])
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 10:
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _after(rec: dict[str, Any], job: str, step: int) -> bool:
    """Whether ``rec`` is a step record of ``job`` past ``step``."""
    if rec.get("job") != job or rec.get("kind") != "step":
        return False
    n = rec.get("step", 0)
    return isinstance(n, (int, float)) and n > step
