"""The measurement harness both benchmarks use (``attrctl bench loss`` and ``attrctl bench train``).

* :func:`environment` — device, library versions and git commit, recorded with every result.
* :func:`run_isolated` — each row in its **own process**: one *row server* (a fresh interpreter,
  started with the caller's environment variables) imports what the rows need once, then forks a
  child per row, one at a time, and never runs a row itself, so no row sees memory or state that
  another left behind. A row that fails (an exception, an out-of-memory kill) comes back as an
  error, so one bad row does not throw away the others.
* :func:`peak_memory` — the most memory a block of code holds at once **above** what the process
  held when it began. On CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats`` above
  ``memory_allocated`` before. On CPU torch's allocator keeps no peak statistic and its
  allocations are invisible to ``tracemalloc``, so the kernel's resident-set high-water mark is
  read: ``VmHWM`` is reset (``/proc/self/clear_refs`` ← 5) when the block begins, and peak =
  ``VmHWM`` − ``VmRSS`` at that moment. The resident set only follows what is live if the
  allocator gives freed memory back to the OS: glibc keeps freed blocks below its mmap threshold
  on its heap, where a later call reuses them without raising RSS (which would hide its peak).
  :data:`MALLOC_RETURNS_MEMORY_ENV` sets that for a whole process from its start;
  :func:`malloc_returns_memory` switches it on from a point on.
* :func:`timed_calls`, :func:`spread` — wall time of repeated calls (synchronized on CUDA) and
  their median and range.
* :func:`cell`, :func:`markdown_row`, :func:`markdown_rule` — the pieces of the Markdown tables.
"""

from __future__ import annotations

import gc
import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attrctl.errors import AttrctlError

# --------------------------------------------------------------------------- environment


def environment(device: str = "cpu") -> dict[str, str]:
    """Device, library versions and git commit, recorded with every row."""

    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    if device.startswith("cuda") and torch.cuda.is_available():
        dev_name = torch.cuda.get_device_name(torch.device(device))
    else:
        dev_name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    dev_name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "device_name": dev_name,
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "triton": version("triton"),
        "python": platform.python_version(),
        "git_commit": commit or "unknown",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


# --------------------------------------------------------------------------- a process per row


@dataclass
class Outcome:
    """What one isolated row gave back: the worker's result, or why there is none."""

    value: dict[str, Any] | None = None
    error: str | None = None  # "failed: …"


#: Prefix of the server's result lines on its stdout (anything else there is the rows' own output).
_TAG = "attrctl-bench-row "
_SERVER = "import sys; from attrctl.bench.harness import serve; serve(sys.argv[1])"


def _name(fn: Callable) -> str:
    return f"{fn.__module__}:{fn.__qualname__}"


def _resolve(name: str) -> Callable:
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def run_isolated(
    worker: Callable[[dict[str, Any]], dict[str, Any]],
    payloads: Sequence[dict[str, Any]],
    *,
    warm: Callable[[list[dict[str, Any]]], None] | None = None,
    env: Mapping[str, str] | None = None,
) -> list[Outcome]:
    """``worker(payload)`` for each payload, each in its own process; one outcome per payload.

    ``worker`` and ``warm`` must be module-level functions (the server imports them by name);
    payloads and results must be JSON. ``warm(payloads)`` runs once in the server before the
    first fork (imports, say: a fresh interpreter per row would pay them every time); it must not
    start torch's OpenMP pool (no torch op, or only on one thread), which a forked row could not
    use. ``env``: environment variables added to this process's, for the server and its rows.
    """
    job = {"worker": _name(worker), "warm": warm and _name(warm), "payloads": list(payloads)}
    # cwd outside the repo: a repo-root cwd would put a top-level `kernels` on sys.path
    proc = subprocess.run(
        [sys.executable, "-c", _SERVER, json.dumps(job)],
        capture_output=True,
        text=True,
        env={**os.environ, **env} if env else None,
        cwd=Path.home() if Path.home().is_dir() else "/",
        check=False,
    )
    # one line per payload, in order (the server waits for each row before the next)
    out = [
        Outcome(**json.loads(line[len(_TAG) :]))
        for line in proc.stdout.splitlines()
        if line.startswith(_TAG)
    ]
    if len(out) < len(payloads):  # the server itself failed
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        why = " | ".join(lines[-3:]) or f"exit code {proc.returncode}"
        out += [Outcome(error=f"failed: {why}") for _ in payloads[len(out) :]]
    return out


def _run_one(worker: Callable, payload: dict[str, Any]) -> dict[str, Any]:
    """In a row's process: the worker's result or the error it raised (:class:`Outcome`)."""
    try:
        return {"value": worker(payload), "error": None}
    except AttrctlError as err:
        return {"value": None, "error": f"failed: {err}"}
    except Exception:
        traceback.print_exc()
        lines = traceback.format_exc().strip().splitlines()
        return {"value": None, "error": "failed: " + " | ".join(lines[-3:])}


def serve(job_json: str) -> None:
    """The row server (:func:`run_isolated`): warm up, then one forked child per payload; a
    result line per payload on stdout."""
    job = json.loads(job_json)
    worker, payloads = _resolve(job["worker"]), job["payloads"]
    if job["warm"]:
        _resolve(job["warm"])(payloads)
    threads = torch.get_num_threads()
    for payload in payloads:
        r, w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the row's own process
            os.close(r)
            torch.set_num_threads(threads)
            status = 0
            try:
                result = _run_one(worker, payload)
                with os.fdopen(w, "w") as fh:
                    fh.write(json.dumps(result))
            except BaseException:
                traceback.print_exc()
                status = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        os.close(w)
        with os.fdopen(r) as fh:
            text = fh.read()
        _, status = os.waitpid(pid, 0)
        if not text:
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            why = f"killed by signal {sig} (out of memory?)" if sig else "crashed (see stderr)"
            text = json.dumps({"value": None, "error": f"failed: row process {why}"})
        print(_TAG + text, flush=True)


# --------------------------------------------------------------------------- peak memory

#: glibc allocator settings under which freed memory goes back to the OS: blocks ≥ 1 MiB are
#: mmapped (and unmapped when freed), and the heap is trimmed on every free.
MMAP_THRESHOLD = 2**20
#: The same settings for a whole process, from its start (glibc reads them at startup).
MALLOC_RETURNS_MEMORY_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": "0",
}


def malloc_returns_memory() -> bool:
    """The same settings from now on (glibc ``mallopt`` M_MMAP_THRESHOLD, M_TRIM_THRESHOLD;
    ``malloc_trim`` releases what is cached). Returns False where there is no glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, MMAP_THRESHOLD) == 1 and libc.mallopt(-1, 0) == 1
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


def proc_status_kb(key: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (``VmHWM``) to the current ``VmRSS``;
    False where that is unavailable (``VmHWM`` then still holds every earlier peak)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class PeakMemory:
    """What :func:`peak_memory` measured (MiB)."""

    cuda: bool
    base_mb: float = 0.0  # held when the block began
    peak_mb: float = 0.0  # the most held at once above base_mb during the block
    hwm_reset: bool = True  # CPU: the high-water mark was reset (else it includes earlier peaks)
    returns_freed: bool = True  # CPU, return_freed=True: the switch worked (False: no glibc)


@contextmanager
def peak_memory(cuda: bool, *, return_freed: bool = False) -> Iterator[PeakMemory]:
    """Measure the peak memory the ``with`` block holds above what was held when it began (the
    yielded :class:`PeakMemory` is filled in when the block ends). ``return_freed``: on CPU,
    first switch the allocator to return freed memory (:func:`malloc_returns_memory`), for a
    process not started with :data:`MALLOC_RETURNS_MEMORY_ENV`."""
    mem = PeakMemory(cuda)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        mem.base_mb = torch.cuda.memory_allocated() / 2**20
    else:
        if return_freed:
            mem.returns_freed = malloc_returns_memory()
        mem.hwm_reset = reset_peak_rss()
        mem.base_mb = proc_status_kb("VmRSS") / 1024
    yield mem
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = proc_status_kb("VmHWM") / 1024
    mem.peak_mb = max(peak - mem.base_mb, 0.0)


# --------------------------------------------------------------------------- timing


def _no_sync() -> None:
    pass


def timed_calls(
    fn: Callable[[], Any], repeats: int, *, cuda: bool = False, after: Callable[[], Any] = _no_sync
) -> tuple[list[float], list[Any]]:
    """Call ``fn`` ``repeats`` times; the wall seconds of each call (CUDA synchronized before and
    after) and what each returned. ``after`` runs after each call, untimed."""
    sync = torch.cuda.synchronize if cuda else _no_sync
    times, results = [], []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        results.append(fn())
        sync()
        times.append(time.perf_counter() - t0)
        after()
    return times, results


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``; None where either is missing or ``b`` is 0."""
    return None if a is None or not b else a / b


# --------------------------------------------------------------------------- tables


def cell(x: float | None, spec: str) -> str:
    """A number formatted for a table, or "—" where it is missing."""
    return "—" if x is None else format(x, spec)


def markdown_row(cells: Sequence[str]) -> str:
    """``| a | b |``; an empty cell is written ``| |``."""
    return "|" + "".join(f" {c} |" if c else " |" for c in cells)


def markdown_rule(columns: int) -> str:
    """The rule under a header of ``columns`` columns."""
    return "|" + "---|" * columns
