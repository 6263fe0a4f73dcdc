"""The benchmark harness at a tiny shape: schema, correctness gate, isolation, CLI, plot."""

from __future__ import annotations

import json

import pytest
import torch
from attrctl.cli import main

import attrctl.bench.loss as bench
from attrctl.bench.loss import RowSpec, check_correctness, make_inputs, run_loss_benchmark
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
    assert check_correctness(RowSpec("chunked", "fwd_bwd", "t", 16, 300, 32)) < 1e-5
    with pytest.raises(AttrctlError, match="unknown impl"):
        run_loss_benchmark(shapes=["16x300"], ns=[8], impls=["fast"])
    with pytest.raises(AttrctlError, match="unknown shape"):
        run_loss_benchmark(shapes=["gpt9"], ns=[8])


def _wrong_kl_gradient(bug: str):
    """A ``make_call`` whose chunked loss has the right value but a wrong KL gradient: without
    the KL term (``no_kl``) or with its sign flipped (``kl_sign``)."""
    real = bench.make_call

    def make_call(impl):
        if impl != "chunked":
            return real(impl)

        def call(inp):
            full = real("chunked")(inp)
            ce_only = real("chunked")({**inp, "lam": torch.zeros_like(inp["lam"])})
            wrong = ce_only if bug == "no_kl" else 2 * ce_only - full  # ∇CE ∓ ∇(λ·KL)
            return wrong + (full - wrong).detach()  # the value of `full`, the gradient of `wrong`

        return call

    return make_call


def _grads(call, spec):
    inp = make_inputs(spec)
    inp["lam"] = torch.ones_like(inp["lam"])
    for key in ("hidden", "lm_weight"):
        inp[key].requires_grad_()
    loss = call(inp)
    loss.backward()
    return loss.item(), [loss.detach(), inp["hidden"].grad, inp["lm_weight"].grad]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("bug", ["no_kl", "kl_sign"])
def test_correctness_gate_fails_a_wrong_kl_gradient(monkeypatch, dtype, bug):
    spec = RowSpec("chunked", "fwd_bwd", "t", 16, 300, 64, dtype=dtype)
    assert check_correctness(spec) < 1e-5  # the real chunked impl passes
    broken = _wrong_kl_gradient(bug)
    # the injected bug is real: the loss value is right, the gradients are not
    loss, ref = _grads(bench.make_call("eager"), spec)
    _, got = _grads(broken("chunked"), spec)
    assert (got[0] - ref[0]).abs().item() < 1e-5 * loss
    assert (got[1] - ref[1]).norm() > 0.05 * ref[1].norm()
    monkeypatch.setattr(bench, "make_call", broken)
    with pytest.raises(AttrctlError, match=r"grad hidden .*grad lm_weight"):
        check_correctness(spec)


@pytest.mark.slow
def test_correctness_gate_fails_a_missing_kl_term_at_the_smollm2_shape(monkeypatch):
    """The tightest case of CHECK_RTOL: bf16 at V = 49,152, where the KL term is ~1.3% of the
    gradients (the gate is 0.5%)."""
    spec = RowSpec("chunked", "fwd_bwd", "smollm2", 576, 49152, 64, dtype="bf16")
    check_correctness(spec)
    broken = _wrong_kl_gradient("no_kl")
    # the previous gate, max |impl − eager| ≤ 1e-3·max(1, loss), let this bug through
    loss, ref = _grads(bench.make_call("eager"), spec)
    _, got = _grads(broken("chunked"), spec)
    old_gate_err = max((g - r).abs().max().item() for g, r in zip(got, ref, strict=True))
    assert old_gate_err <= 1e-3 * max(1.0, loss)
    monkeypatch.setattr(bench, "make_call", broken)
    with pytest.raises(AttrctlError, match="grad hidden"):
        check_correctness(spec)


def test_a_failing_row_is_reported_not_fatal():
    """A worker that dies (here: an unknown dtype) gives a row with `error`, not an exception."""
    from attrctl.bench.loss import run_row

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


def test_sampler_profile_splits_the_time_and_counts_the_floor():
    from attrctl.bench.sampler import _linear_shapes, describe, profile_sampler
    from attrctl.models import load_model

    loaded = load_model("tiny-random")
    r = profile_sampler(loaded.model, loaded.tokenizer, ["You are", "The weather"] * 2,
                        max_new_tokens=3)  # fmt: skip
    assert r["rows"] == 4 and 0 < r["tokens"] <= 12
    parts = r["matmul_seconds"] + r["sampling_seconds"] + r["other_seconds"]
    assert parts == pytest.approx(r["op_seconds"]) and r["matmul_seconds"] > 0
    assert r["floor_seconds"] > 0 and r["floor_share"] == pytest.approx(
        r["floor_seconds"] / r["seconds"]
    )
    # the floor counts every linear map a token passes through: 2 layers × 7 + the LM head
    cfg = loaded.model.config
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
    assert r["flop_per_token"] == 2 * (cfg.num_hidden_layers * per_layer + h * v)
    assert len(_linear_shapes(loaded.model)) == 7 * cfg.num_hidden_layers + 1
    assert "matmul floor" in describe(r)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report without CUDA")
def test_gpu_check_without_cuda_reports_every_part_skipped(tmp_path):
    from attrctl.bench.gpucheck import exit_code, gpu_check

    report = gpu_check(tmp_path, quick=True)
    for part in ("tests", "bench_loss", "finetune"):
        assert report[part]["status"] == "skipped", report[part]
        assert report[part]["reason"] == "no CUDA device here"
    assert report["tests"]["counts"]["skipped"] > 0  # the gpu tests were collected and skipped
    assert exit_code(report) == 0
    assert json.loads((tmp_path / "gpu_check.json").read_text())["cuda"] is None
    assert "| finetune | skipped |" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.slow  # ~40 s: the GPU day's own policy and parsing; `make test-all` runs it
def test_gpu_check_finetune_path_runs_on_cpu():
    """The fine-tune part's policy and parsing, on CPU with two steps (CUDA runs forty)."""
    from attrctl.bench.gpucheck import run_finetune

    part = run_finetune(timeout=300, device="cpu", steps=2)
    assert part["status"] == "passed", part
    assert part["ce_last"] > 0 and part["kl_last"] >= 0
