"""The benchmark harness at a tiny shape: schema, correctness gate, isolation, CLI, plot."""

from __future__ import annotations

import json

import pytest
from attrctl.cli import main

from attrctl.bench import RowSpec, check_correctness, run_loss_benchmark
from attrctl.errors import AttrctlError

REQUIRED = {"impl", "mode", "H", "V", "N", "dtype", "median_ms", "peak_mb"}


def test_loss_benchmark_rows_and_ratios():
    rows = run_loss_benchmark(
        shapes=["32x700"], ns=[64, 256], impls=["eager", "chunked"], modes=["fwd_bwd"], repeats=1
    )
    assert len(rows) == 4
    for r in rows:
        assert r.error is None and r.median_ms > 0 and r.peak_mb >= 0
        assert r.env["git_commit"] and r.env["torch"]
        assert "VmHWM" in r.memory_method or "ru_maxrss" in r.memory_method
    eager = {r.N: r for r in rows if r.impl == "eager"}
    assert all(r.time_vs_eager == 1.0 for r in eager.values())
    # eager holds [N, V] fp32 tensors: its peak must grow with N (the measurement sees it)
    assert eager[256].peak_mb > eager[64].peak_mb


def test_correctness_gate_rejects_unknown_and_checks_values():
    assert check_correctness(RowSpec("chunked", "fwd_bwd", "t", 16, 300, 32)) < 1e-4
    with pytest.raises(AttrctlError, match="unknown impl"):
        run_loss_benchmark(shapes=["16x300"], ns=[8], impls=["fast"])
    with pytest.raises(AttrctlError, match="unknown shape"):
        run_loss_benchmark(shapes=["gpt9"], ns=[8])


def test_a_failing_row_is_reported_not_fatal():
    """A worker that dies (here: an unknown dtype) gives a row with `error`, not an exception."""
    from attrctl.bench import run_row

    row = run_row(RowSpec("chunked", "fwd_bwd", "t", 16, 300, 8, dtype="fp7"), isolate=True)
    assert row.error and row.error.startswith("failed:")
    assert row.median_ms is None and (row.impl, row.N) == ("chunked", 8)


def test_cli_json_and_plot(tmp_path, capsys):
    png = tmp_path / "bench.png"
    code = main(
        ["bench", "loss", "--shapes", "16x300", "--n", "32", "--impls", "chunked",
         "--modes", "fwd", "--repeats", "1", "--json", "--plot", str(png)]
    )  # fmt: skip
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0].keys() >= REQUIRED
    assert rows[0]["impl"] == "chunked" and rows[0]["mode"] == "fwd"
    assert png.stat().st_size > 1000
