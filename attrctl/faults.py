"""Named fault points: a test makes a running attrctl process stop, die or wait at an exact place.

Kill/resume, SIGTERM and concurrency tests used to poll the run directory for a moment to strike,
and a faster (or busier) machine skipped the window. Instead the product names the places where a
fault is interesting, and a test asks for one through the environment:

    ATTRCTL_FAULT="finetune/2:step=2:SIGKILL"          die right after θ_2's step 2 (and its
                                                         checkpoint)
    ATTRCTL_FAULT="finetune/1:step=1:SIGTERM"          a SIGTERM at the end of θ_1's step 1
    ATTRCTL_FAULT="parallel/1:barrier=3"               each role of parallel iteration 1 waits at
                                                         its start until all 3 have arrived
    ATTRCTL_FAULT="fit/1:step=1:pause"                 write <dir>/fit_1.paused, wait for
                                                         <dir>/fit_1.go

A spec is ``POINT[:KEY=VALUE ...]:ACTION``; several are separated by commas. It fires where the code
calls ``fault(POINT, KEY=VALUE, ...)`` with every KEY=VALUE of the spec among the call's (compared
as strings). Actions: ``SIGKILL``, ``SIGTERM``, ``SIGINT`` (the process raises the signal on
itself), ``exit=N`` (``os._exit(N)``: a crash without cleanup), ``pause`` and ``barrier=N`` (these
two need ``ATTRCTL_FAULT_DIR``, a folder the test owns; they wait at most
``ATTRCTL_FAULT_TIMEOUT`` seconds, default 600, then raise — a hang becomes a failure).

The points (grep ``fault(`` for the list): ``sample/<i>`` (``batch=<n>`` after each sampled batch),
``fit/<i>`` (``step=<n>`` after each optimizer step of head fitting), ``finetune/<i>`` (``step=<n>``
at the end of each step, after its checkpoint), ``publish`` (``job=<name>`` right after a job is
recorded in the manifest, before its plot), ``parallel/<i>`` (``role=<role>`` as a parallel role
process starts).

Unset, :func:`fault` is one environment lookup: nothing else happens.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from attrctl.errors import AttrctlError

ENV, DIR_ENV, TIMEOUT_ENV = "ATTRCTL_FAULT", "ATTRCTL_FAULT_DIR", "ATTRCTL_FAULT_TIMEOUT"
_SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}


@dataclass(frozen=True)
class FaultSpec:
    point: str
    where: tuple[tuple[str, str], ...]
    action: str
    arg: int | None = None

    def matches(self, point: str, where: dict[str, object]) -> bool:
        return point == self.point and all(str(where.get(k)) == v for k, v in self.where)


@functools.lru_cache(maxsize=8)  # called at every step while a test sets ATTRCTL_FAULT
def parse(text: str) -> tuple[FaultSpec, ...]:
    """``ATTRCTL_FAULT``'s value as specs; a malformed one is an error naming it."""
    specs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        fields = part.split(":")
        if len(fields) < 2:
            raise AttrctlError(f"{ENV}={text!r}: {part!r} is not POINT[:KEY=VALUE...]:ACTION")
        point, *conds, action = fields
        where = []
        for c in conds:
            key, eq, value = c.partition("=")
            if not eq or not key:
                raise AttrctlError(f"{ENV}={text!r}: {c!r} in {part!r} is not KEY=VALUE")
            where.append((key, value))
        name, _, arg = action.partition("=")
        if name in _SIGNALS or name == "pause":
            if arg:
                raise AttrctlError(f"{ENV}={text!r}: action {name} takes no value")
            specs.append(FaultSpec(point, tuple(where), name))
        elif name in ("barrier", "exit") and arg.isdigit():
            specs.append(FaultSpec(point, tuple(where), name, int(arg)))
        else:
            raise AttrctlError(
                f"{ENV}={text!r}: unknown action {action!r} (SIGKILL, SIGTERM, SIGINT, exit=N, "
                "pause, barrier=N)"
            )
    return tuple(specs)


def fault(point: str, **where: object) -> None:
    """Fire the fault a test asked for at this named point, if any (see the module docstring)."""
    text = os.environ.get(ENV)
    if not text:
        return
    for spec in parse(text):
        if spec.matches(point, where):
            _fire(spec, point, where)


def _fire(spec: FaultSpec, point: str, where: dict[str, object]) -> None:
    if spec.action in _SIGNALS:
        signal.raise_signal(_SIGNALS[spec.action])
        return
    if spec.action == "exit":
        os._exit(spec.arg or 0)
    folder = os.environ.get(DIR_ENV)
    if not folder:
        raise AttrctlError(f"{ENV}: action {spec.action} at {point} needs {DIR_ENV} (a folder)")
    label = point.replace("/", "_")
    deadline = time.monotonic() + float(os.environ.get(TIMEOUT_ENV, "600"))
    if spec.action == "pause":  # the marker appears whole (renamed into place): a test that
        tmp = Path(folder) / f".{label}.paused.{os.getpid()}"  # sees it can read the pid at once
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, Path(folder) / f"{label}.paused")
        _wait(lambda: (Path(folder) / f"{label}.go").exists(), deadline, f"{label}.go")
        return
    # barrier: every process that reaches this point announces itself, then waits for the others
    room = Path(folder) / label
    room.mkdir(parents=True, exist_ok=True)
    tag = "_".join(f"{k}-{v}" for k, v in sorted(where.items())) or "x"
    (room / f"{tag}.{os.getpid()}").write_text("")
    n = spec.arg or 0
    _wait(lambda: len(list(room.iterdir())) >= n, deadline, f"{n} arrivals in {room}")


def _wait(done, deadline: float, what: str) -> None:
    # Waiting for another process's word, not measuring time: the deadline only turns a hang
    # (e.g. roles that do not run at the same time) into an error.
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{ENV}: gave up waiting for {what}")
        time.sleep(0.01)
