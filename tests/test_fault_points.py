"""The fault points tests use to stop a run at an exact place (attrctl/faults.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from attrctl.errors import AttrctlError
from attrctl.faults import fault, parse


def test_specs_parse_and_match_only_their_point():
    (spec,) = parse("finetune/2:step=3:SIGKILL")
    assert spec.matches("finetune/2", {"step": 3})
    assert not spec.matches("finetune/2", {"step": 4})
    assert not spec.matches("finetune/1", {"step": 3})
    both = parse("fit/1:step=1:pause, parallel/2:barrier=3")
    assert [(s.point, s.action, s.arg) for s in both] == [
        ("fit/1", "pause", None),
        ("parallel/2", "barrier", 3),
    ]


@pytest.mark.parametrize(
    "text, needle",
    [("finetune/2", "POINT[:KEY=VALUE...]:ACTION"), ("finetune/2:step:SIGKILL", "KEY=VALUE"),
     ("finetune/2:SIGHUP", "unknown action 'SIGHUP'"), ("x:barrier=three", "unknown action"),
     ("x:SIGKILL=1", "takes no value")],
)  # fmt: skip
def test_a_malformed_spec_is_an_error_naming_it(text, needle, monkeypatch):
    with pytest.raises(AttrctlError, match="ATTRCTL_FAULT") as err:
        parse(text)
    assert needle in str(err.value)


def test_unset_or_unmatched_is_inert(monkeypatch):
    monkeypatch.delenv("ATTRCTL_FAULT", raising=False)
    fault("finetune/1", step=1)
    monkeypatch.setenv("ATTRCTL_FAULT", "finetune/1:step=2:SIGKILL")
    fault("finetune/1", step=1)  # another step: nothing happens (this test would die otherwise)


def _child(spec: str, code: str, **extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ATTRCTL_FAULT": spec, **extra}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_signal_and_exit_actions_fire_at_the_point():
    code = "from attrctl.faults import fault\nfor s in range(1, 5):\n    print(s, flush=True)\n" \
           "    fault('job/1', step=s)\n"  # fmt: skip
    proc = _child("job/1:step=2:SIGKILL", code)
    assert proc.returncode == -signal.SIGKILL and proc.stdout.split() == ["1", "2"]
    proc = _child("job/1:step=3:exit=7", code)
    assert proc.returncode == 7 and proc.stdout.split() == ["1", "2", "3"]


def _party(role: str) -> str:
    return f"from attrctl.faults import fault\nfault('p/1', role={role!r})\nprint('through')\n"


def test_barrier_waits_for_every_party(tmp_path):
    env = {**os.environ, "ATTRCTL_FAULT": "p/1:barrier=2", "ATTRCTL_FAULT_DIR": str(tmp_path),
           "ATTRCTL_FAULT_TIMEOUT": "300"}  # fmt: skip
    first = subprocess.Popen([sys.executable, "-c", _party("a")], env=env,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    room = tmp_path / "p_1"
    while not (room.is_dir() and any(room.iterdir())):  # the first party has arrived
        assert first.poll() is None, "the first party went through alone"
        os.sched_yield()
    assert first.poll() is None  # still waiting for the second party
    second = _child("p/1:barrier=2", _party("b"), ATTRCTL_FAULT_DIR=str(tmp_path),
                    ATTRCTL_FAULT_TIMEOUT="300")  # fmt: skip
    out, _ = first.communicate(timeout=300)
    assert second.returncode == 0 and second.stdout.strip() == "through"
    assert first.returncode == 0 and out.strip() == "through"
    assert sorted(p.name.split(".")[0] for p in room.iterdir()) == ["role-a", "role-b"]


def test_a_party_left_alone_gives_up_with_an_error(tmp_path):
    proc = _child("p/1:barrier=2", _party("a"), ATTRCTL_FAULT_DIR=str(tmp_path),
                  ATTRCTL_FAULT_TIMEOUT="0")  # fmt: skip
    assert proc.returncode != 0 and "gave up waiting for 2 arrivals" in proc.stderr
    assert "through" not in proc.stdout


def test_pause_waits_for_the_go_file(tmp_path):
    code = "from attrctl.faults import fault\nfault('fit/1', step=1)\nprint('resumed')\n"
    env = {**os.environ, "ATTRCTL_FAULT": "fit/1:step=1:pause", "ATTRCTL_FAULT_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    marker = tmp_path / "fit_1.paused"
    while not marker.exists():  # waiting for the child's word; no window, no assertion on time
        assert proc.poll() is None, "the child ended without pausing"
        os.sched_yield()
    assert marker.read_text().strip() == str(proc.pid) and proc.poll() is None
    (tmp_path / "fit_1.go").touch()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.strip() == "resumed"
