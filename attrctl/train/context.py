"""What every job of a run shares: the policy, its compiled objects, the run directory, the
process's place in a ``torchrun`` group, and how progress is shown."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attrctl.paths import atomic_write
from attrctl.policy.compile import CompiledPolicy
from attrctl.train.rundir import RunDir


@dataclass
class TrainContext:
    """One process's view of a run.

    Attributes:
        compiled: the compiled policy (λ_d resolved, ``auto`` included).
        run: the run directory.
        rank, world: place in a ``torchrun`` group (0, 1 without one); rank 0 writes the run dir.
        progress: how progress is reported (a rich bar in the foreground process, a status file
            in a parallel role process, nothing in tests).
    """

    compiled: CompiledPolicy
    run: RunDir
    rank: int = 0
    world: int = 1
    progress: Any = None
    _cache: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def policy(self):
        return self.compiled.policy

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def bar(self, job: str, total: int, unit: str):
        """A progress handle for one job (no-op without a reporter or off rank 0)."""
        if self.progress is None or not self.writer:
            return _NullBar()
        return self.progress.bar(job, total, unit)

    def mixture(self):
        """The policy's data mixture, loaded once per process."""
        if "mixture" not in self._cache:
            from attrctl.data import build_mixture

            self._cache["mixture"] = build_mixture(self.policy)
        return self._cache["mixture"]

    def role_device(self, role: str) -> str:
        return self.policy.schedule.role(role).device

    def log(self, record: dict) -> None:
        if self.writer:
            self.run.log({"time": round(time.time(), 3), **record})


class _NullBar:
    def update(self, n: int = 1, **info: Any) -> None:
        pass

    def close(self) -> None:
        pass


class StatusFileProgress:
    """Progress of a parallel role process, written to a small JSON file its parent renders."""

    def __init__(self, path: Path):
        self.path = path

    def bar(self, job: str, total: int, unit: str):
        return _StatusBar(self.path, job, total, unit)


class _StatusBar:
    def __init__(self, path: Path, job: str, total: int, unit: str):
        self.path, self.job, self.total, self.unit = path, job, total, unit
        self.done, self.info, self._last = 0, {}, 0.0
        self._write()

    def update(self, n: int = 1, **info: Any) -> None:
        self.done += n
        self.info.update(info)
        if time.monotonic() - self._last > 0.5 or self.done >= self.total:
            self._write()

    def close(self) -> None:
        self._write()

    def _write(self) -> None:
        self._last = time.monotonic()
        with atomic_write(self.path) as fh:
            json.dump(
                {"job": self.job, "done": self.done, "total": self.total, "unit": self.unit,
                 "info": self.info, "pid": os.getpid()}, fh,
            )  # fmt: skip


class StopRequest:
    """SIGINT/SIGTERM during ``train``: the fine-tune loop finishes its step, saves a checkpoint and
    stops (``Interrupted``); elsewhere (sampling, fitting, which redo cleanly on resume) the signal
    interrupts at once. Installed by :func:`attrctl.train.schedules.train` in the main thread."""

    requested = False
    in_loop = False

    @classmethod
    def install(cls):
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return None
        cls.requested = False

        def handler(signum, _frame):
            cls.requested = True
            if not cls.in_loop:
                raise KeyboardInterrupt(signal.Signals(signum).name)

        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    @classmethod
    def begin_job(cls) -> None:
        """A fine-tune loop starts: a signal from now on is a request the loop honours at its
        next step boundary. A request left from an earlier job was honoured (or raised) there, so
        none is carried over."""
        cls.requested = False
        cls.in_loop = True

    @classmethod
    def end_job(cls) -> None:
        """The loop is done; a request made during its last step stays set for the caller
        (``schedules._run`` stops the run once the finished job is published)."""
        cls.in_loop = False

    @staticmethod
    def restore(previous) -> None:
        import signal

        for s, h in (previous or {}).items():
            signal.signal(s, h)
