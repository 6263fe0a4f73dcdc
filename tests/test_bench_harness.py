"""The measurement harness both benchmarks share (attrctl.bench.harness): a process per row, its
failures as outcomes, the peak-RSS reset, and the table pieces."""

from __future__ import annotations

import importlib
import os
import textwrap

import pytest

from attrctl.bench.harness import cell, markdown_row, markdown_rule, ratio, run_isolated, spread

WORKER = textwrap.dedent(
    """
    import os, signal

    import torch

    from attrctl.bench.harness import peak_memory, reset_peak_rss
    from attrctl.errors import AttrctlError

    STATE = {}


    def warm(payloads):
        STATE["warmed"] = len(payloads)


    def work(payload):
        case = payload["case"]
        if case == "ok":
            seen = dict(STATE)
            STATE["row"] = payload["n"]  # a later row must not see this
            return {"pid": os.getpid(), "ppid": os.getppid(), "seen": seen}
        if case == "refused":
            raise AttrctlError("no such row")
        if case == "bug":
            raise KeyError("fp7")
        if case == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        if case == "memory":
            if not reset_peak_rss():
                return {"supported": False}
            with peak_memory(cuda=False) as first:
                big = torch.ones(2**25)  # 128 MiB, written
                del big
            with peak_memory(cuda=False) as second:
                small = torch.ones(2**20)  # 4 MiB
                del small
            return {"supported": True, "first": first.peak_mb, "second": second.peak_mb,
                    "base": second.base_mb, "reset": first.hwm_reset and second.hwm_reset}
        raise ValueError(case)
    """
)


@pytest.fixture
def worker(tmp_path, monkeypatch):
    """A worker module importable here and in the row server (through PYTHONPATH)."""
    (tmp_path / "bench_rows_under_test.py").write_text(WORKER)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    return importlib.import_module("bench_rows_under_test"), {"PYTHONPATH": path}


def test_each_row_runs_in_its_own_process_and_failures_come_back(worker):
    mod, env = worker
    cases = [{"case": "ok", "n": 1}, {"case": "refused"}, {"case": "bug"}, {"case": "killed"},
             {"case": "ok", "n": 2}]  # fmt: skip
    first, refused, bug, killed, last = run_isolated(mod.work, cases, warm=mod.warm, env=env)
    # the server warmed up once, before the forks; it never ran a row, so no row saw another's
    assert first.error is None and last.error is None
    assert first.value["seen"] == last.value["seen"] == {"warmed": len(cases)}
    assert first.value["pid"] != last.value["pid"] != os.getpid()
    assert first.value["ppid"] == last.value["ppid"] != os.getpid()  # forked by one server
    # a failed row is an outcome with its reason, and the rows after it still run
    assert refused.value is None and refused.error == "failed: no such row"
    assert bug.error.startswith("failed: ") and bug.error.endswith("KeyError: 'fp7'")
    assert killed.error == "failed: row process killed by signal 9 (out of memory?)"


def test_a_server_that_cannot_start_fails_every_row(worker):
    mod, _ = worker
    env = {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}  # without the worker's folder
    outcomes = run_isolated(mod.work, [{"case": "ok", "n": 1}] * 2, env=env)
    assert [o.value for o in outcomes] == [None, None]
    assert all("No module named 'bench_rows_under_test'" in o.error for o in outcomes)


def test_the_peak_rss_reset_keeps_an_earlier_peak_out_of_the_next_measurement(worker):
    mod, env = worker
    (out,) = run_isolated(mod.work, [{"case": "memory"}], env=env)
    assert out.error is None, out.error
    if not out.value["supported"]:
        pytest.skip("/proc/self/clear_refs cannot reset VmHWM here")
    assert out.value["reset"] and out.value["base"] > 0
    assert out.value["first"] >= 100  # the 128 MiB tensor is seen
    assert out.value["second"] < 64  # …and not inherited by the next measurement (4 MiB)


def test_statistics_and_table_pieces():
    assert spread([3.0, 1.0, 2.0, 10.0]) == (2.5, 1.0, 10.0)
    assert ratio(3.0, 2.0) == 1.5 and ratio(None, 2.0) is None and ratio(1.0, 0.0) is None
    assert cell(None, ".2f") == "—" and cell(1.234, ".2f") == "1.23"
    assert markdown_row(["", "a", "b", ""]) == "| | a | b | |"
    assert markdown_rule(3) == "|---|---|---|"
