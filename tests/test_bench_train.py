"""``attrctl bench train`` on the tiny model: the three steps, their ratios and throughputs."""

from __future__ import annotations

import json

import pytest

from attrctl.bench_train import REQUIRED_KEYS, ROWS, TrainBenchSpec, measure, run_rows
from attrctl.errors import AttrctlError


def test_bench_train_cli_prints_every_required_key(run_cli, monkeypatch):
    # one thread: on a shared machine two threads of a tiny model's many small ops spend most of
    # their time waiting for each other (timings here are not the point; the plumbing is)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code, out, err = run_cli("bench", "train", "--model", "tiny-random", "--json", "--steps", "2")
    assert code == 0, err
    result = json.loads(out)
    for key in REQUIRED_KEYS:
        assert isinstance(result[key], float) and result[key] > 0, (key, result[key])
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == list(ROWS)
    for r in rows.values():
        assert r["error"] is None and r["repeats"] >= 1 and r["median_s"] > 0
    for name in ("sft", "sft_fused", "reg", "head_fit"):
        assert "VmHWM" in rows[name]["memory_method"] and rows[name]["base_mb"] > 0
    # the step rows ran the same model, batch and trainable parameters, and checked their loss
    assert "vs transformers" in rows["sft_fused"]["check"]
    assert rows["reg"]["check"].startswith("vs eager")
    assert {r["setup"]["trainable_params"] for r in rows.values()} == {
        rows["sft"]["setup"]["trainable_params"]
    }
    assert rows["reg"]["repeats"] == 2 * 2 and rows["reg"]["rounds"] == 2  # --steps 2, 2 rounds
    assert rows["reg"]["tokens"] == 8 * 63 and len(rows["reg"]["times_s"]) == 4
    assert result["env"]["git_commit"] and result["env"]["torch"]
    assert result["reg_over_sft_time"] == pytest.approx(result["reg_step_s"] / result["sft_step_s"])


def test_bench_train_rejects_unknown_rows_and_reports_failures(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with pytest.raises(AttrctlError, match="unknown row"):
        measure(TrainBenchSpec("fast", model="tiny-random"))
    # a row that fails in its process comes back as a row with `error`, not an exception
    (row,) = run_rows([TrainBenchSpec("reg", model="tiny-random", overrides=("seed=x",))])
    assert row.error and row.error.startswith("failed:")
