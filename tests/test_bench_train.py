"""``attrctl bench train`` on the tiny model: the three steps, their ratios and throughputs."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

import attrctl.bench.train as bt
from attrctl.bench.train import REQUIRED_KEYS, ROWS, TrainBenchSpec, TrainRow, measure, run_rows
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
    # the summary is made of the rows' own measurements: each step row's median is that of the
    # timed steps it recorded, and the ratios are those of the rows' medians and peaks
    for name in ("sft", "sft_fused", "reg"):
        r = rows[name]
        assert r["median_s"] == statistics.median(r["times_s"]) == result[f"{name}_step_s"]
        assert (r["min_s"], r["max_s"]) == (min(r["times_s"]), max(r["times_s"]))
        assert r["peak_mb"] == result[f"{name}_peak_mb"]
    assert result["reg_over_sft_time"] == rows["reg"]["median_s"] / rows["sft"]["median_s"]
    assert result["reg_over_sft_mem"] == rows["reg"]["peak_mb"] / rows["sft"]["peak_mb"]
    assert result["fused_over_sft_time"] == rows["sft_fused"]["median_s"] / rows["sft"]["median_s"]


def test_bench_train_rejects_unknown_rows_and_reports_failures(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with pytest.raises(AttrctlError, match="unknown row"):
        measure(TrainBenchSpec("fast", model="tiny-random"))
    # a row that fails in its process comes back as a row with `error`, not an exception
    (row,) = run_rows([TrainBenchSpec("reg", model="tiny-random", overrides=("seed=x",))])
    assert row.error and row.error.startswith("failed:")


# ------------------------------------------------------------------ what the step rows really run
@pytest.fixture
def in_process(monkeypatch):
    """Rows measured in this process (``measure``) with their steps observed: every call of the
    fine-tune job's ``micro_step`` (heads, λ, the loss it returned) and of ``optimizer_step``.
    The memory phase is skipped: it retunes this process's allocator, and memory is not what
    these tests observe."""
    calls = {"micro": [], "opt": 0}
    real_micro = bt.micro_step

    def micro_spy(forward, heads, ids, labels, lam, *args, **kwargs):
        out, reg = real_micro(forward, heads, ids, labels, lam, *args, **kwargs)
        calls["micro"].append({"heads": len(heads), "lam": lam.detach().clone(),
                               "kl": out.kl.detach().clone(), "grad_accum": kwargs["grad_accum"]})  # fmt: skip
        return out, reg

    def opt_spy(*args, **kwargs):
        calls["opt"] += 1
        return real_opt(*args, **kwargs)

    real_opt = bt.optimizer_step
    monkeypatch.setattr(bt, "micro_step", micro_spy)
    monkeypatch.setattr(bt, "optimizer_step", opt_spy)
    monkeypatch.setattr(bt, "_memory_phase", lambda fn, cuda: (0.0, 0.0, "skipped"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield calls
    torch.set_num_threads(threads)


def _spec(row: str) -> TrainBenchSpec:
    return TrainBenchSpec(row, model="tiny-random", steps=2, warmup=1)


def test_step_rows_run_what_they_claim(in_process):
    from attrctl.policy import load_policy

    policy = load_policy("toxicity", ["model=tiny-random"])
    lams = {policy.lam_for(d) for d in ("toxic", "general")}  # the policy's domains: 10 and 0.1
    accum = policy.finetune.grad_accum
    steps = 1 + 2  # warmup + timed

    # reg: the fine-tune job's micro-step with the policy's heads and λ > 0, and a KL that is not 0
    row = measure(_spec("reg"))
    assert row.error is None and row.check.startswith("vs eager")
    assert in_process["opt"] == steps and len(in_process["micro"]) == steps * accum
    for call in in_process["micro"]:
        assert call["heads"] == len(policy.attributes) and call["grad_accum"] == accum
        assert call["lam"].unique().tolist() == pytest.approx(sorted(lams))  # fp32 10 and 0.1
        assert float(call["kl"].max()) > 0  # the regularizer does work on every step
    # sft_fused: the same micro-step, no heads, λ = 0, so KL = 0 on every token
    in_process["micro"].clear()
    in_process["opt"] = 0
    row = measure(_spec("sft_fused"))
    assert row.error is None and "vs transformers" in row.check
    assert in_process["opt"] == steps and len(in_process["micro"]) == steps * accum
    for call in in_process["micro"]:
        assert call["heads"] == 0 and not call["lam"].any() and not call["kl"].any()
    # sft: transformers' own loss; attrctl's micro-step never runs, the optimizer steps all the same
    in_process["micro"].clear()
    in_process["opt"] = 0
    row = measure(_spec("sft"))
    assert row.error is None and row.check == "transformers' own loss"
    assert in_process["opt"] == steps and in_process["micro"] == []


@pytest.mark.parametrize("row", ["reg", "sft_fused"])
def test_a_wrong_loss_fails_the_row_before_any_step_is_timed(row, in_process, monkeypatch):
    from attrctl.losses import chunked

    real = chunked.regularized_lm_loss

    def broken(hidden, lm_weight, labels, heads, attr_weights, lam, opts):
        if heads:  # the regularizer dropped: plain CE where CE + λ·KL was asked for
            return real(hidden, lm_weight, labels, [], attr_weights[:0], lam, opts)
        out = real(hidden, lm_weight, labels, heads, attr_weights, lam, opts)
        return out._replace(loss=out.loss * 1.001)  # CE off by 0.1%

    monkeypatch.setattr(chunked, "regularized_lm_loss", broken)
    with pytest.raises(AttrctlError, match="disagrees with the reference"):
        measure(_spec(row))
    assert in_process["micro"] == [] and in_process["opt"] == 0  # nothing was timed


def test_the_summary_pools_each_rows_rounds(monkeypatch):
    """Ratios, medians and peaks come from the rows' recorded steps, pooled over the rounds
    (fake rows with known times: no timing is measured here)."""
    times = {  # per round; pooled, per-round and mean statistics all differ
        "sft": ([1.0, 1.0, 7.0], [2.0, 2.0, 2.0]),
        "sft_fused": ([1.5, 1.5, 1.5], [3.0, 1.0, 1.0]),
        "reg": ([4.0, 4.0, 4.0], [2.0, 2.0, 2.5]),
    }
    peaks = {"sft": (100.0, 120.0), "sft_fused": (90.0, 80.0), "reg": (130.0, 125.0)}
    seen: list[str] = []

    def fake_run_rows(specs, isolate=True):
        out = []
        for spec in specs:
            k = sum(1 for s in seen if s == spec.row)  # this row's round
            seen.append(spec.row)
            if spec.row in times:
                t = times[spec.row][k]
                out.append(TrainRow(spec.row, median_s=statistics.median(t), min_s=min(t),
                                    max_s=max(t), repeats=len(t), times_s=list(t),
                                    peak_mb=peaks[spec.row][k], base_mb=500.0, tokens=504))  # fmt: skip
            else:
                out.append(TrainRow(spec.row, median_s=1.0, tokens_per_s=10.0 + k))
        return out

    monkeypatch.setattr(bt, "run_rows", fake_run_rows)
    result = bt.run_train_benchmark(model="tiny-random", steps=3, rounds=2)
    # the step rows ran twice each, rotated, so no row is always first after an idle spell
    assert seen[:6] == ["sft", "sft_fused", "reg", "sft_fused", "reg", "sft"]
    pooled = {name: [*a, *b] for name, (a, b) in times.items()}
    med = {name: statistics.median(t) for name, t in pooled.items()}
    assert med["sft"] != statistics.median(times["sft"][0])  # pooling is observable here
    rows = {r["row"]: r for r in result["rows"]}
    for name in times:
        assert rows[name]["times_s"] == pooled[name] and rows[name]["rounds"] == 2
        assert result[f"{name}_step_s"] == med[name] and rows[name]["median_s"] == med[name]
        assert result[f"{name}_peak_mb"] == max(peaks[name])
    assert result["reg_over_sft_time"] == med["reg"] / med["sft"]
    assert result["fused_over_sft_time"] == med["sft_fused"] / med["sft"]
    assert result["reg_over_sft_mem"] == max(peaks["reg"]) / max(peaks["sft"])
    assert result["fused_over_sft_mem"] == max(peaks["sft_fused"]) / max(peaks["sft"])
    t, m = result["reg_over_sft_time"], result["reg_over_sft_mem"]
    assert result["bar"]["met"] == (t <= bt.BAR["time"] and m <= bt.BAR["mem"])
