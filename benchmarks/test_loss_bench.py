"""pytest-benchmark view of the loss impls (same inputs and calls as ``attrctl bench loss``).

Run: ``pytest benchmarks/ --benchmark-only`` (add ``--benchmark-json out.json`` to save).
Times only; peak memory needs a fresh process per row: use ``attrctl bench loss`` for it.
N is reduced so a CPU run takes about a minute.
"""

from __future__ import annotations

import pytest
import torch

from attrctl.bench.harness import environment
from attrctl.bench.loss import (
    MODEL_SHAPES,
    RowSpec,
    check_correctness,
    make_call,
    make_step_inputs,
    run_step,
)

IMPLS = ["eager", "chunked"] + (["triton"] if torch.cuda.is_available() else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("n", [256, 1024])
@pytest.mark.parametrize("shape", ["smollm2"])
def test_loss(benchmark, impl, mode, n, shape):
    h, v = MODEL_SHAPES[shape]
    spec = RowSpec(impl, mode, shape, h, v, n, device=DEVICE)
    if impl != "eager":
        check_correctness(spec)  # correctness before timing
    inp = make_step_inputs(spec)
    call = make_call(impl)
    benchmark.extra_info.update({"H": h, "V": v, "N": n, **environment(DEVICE)})
    benchmark.pedantic(run_step, args=(call, inp, mode), rounds=3, warmup_rounds=1)
