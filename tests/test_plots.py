"""The training plot's smoothing and legends (``attrctl.train.plots``)."""

from __future__ import annotations

import json
import math

import pytest

from attrctl.train.plots import ema, lambda_labels, plot_run
from attrctl.train.rundir import RunDir


def test_ema_keeps_a_constant_and_starts_at_the_first_value():
    assert ema([3.0] * 5) == pytest.approx([3.0] * 5)
    assert ema([1.0, 0.0], beta=0.9)[0] == 1.0
    # bias-corrected: after 1 then 0, the average weights them 1 : 0.9/… as the definition says
    assert ema([1.0, 0.0], beta=0.9)[1] == pytest.approx(0.9 * 0.1 / (1 - 0.81))


def test_ema_smooths_noise_toward_the_mean_and_skips_missing_values():
    noisy = [1.0 if i % 2 else -1.0 for i in range(200)]
    smooth = ema(noisy)
    assert max(abs(v) for v in smooth[50:]) < 0.06  # raw swings by ±1 every step
    with_gap = ema([2.0, math.nan, 2.0])
    assert math.isnan(with_gap[1]) and with_gap[0] == with_gap[2] == pytest.approx(2.0)


def test_legend_lambdas_come_from_the_policy_and_the_measured_auto_values(tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir(parents=True)
    reg = {"lam": 0.0, "per_domain": {"toxic": 10.0, "general": 0.1},
           "own_samples": {"lam": 15.0, "rows": 4}}  # fmt: skip
    (run.root / "policy.json").write_text(json.dumps({"regularization": reg}))
    assert lambda_labels(run) == {"*": 0.0, "toxic": 10.0, "general": 0.1, "own": 15.0}
    reg = {"lam": 0.5, "per_domain": "auto", "own_samples": {"lam": 0.0}}
    (run.root / "policy.json").write_text(json.dumps({"regularization": reg}))
    run.publish("lambdas", {"lam_by_domain": {"toxic": 7.5, "general": 0.5}})
    assert lambda_labels(run) == {"*": 0.5, "toxic": 7.5, "general": 0.5}


def test_a_run_with_steps_is_drawn(tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir(parents=True)
    reg = {"lam": 0.0, "per_domain": {"toxic": 10.0}, "own_samples": {"lam": 15.0}}
    (run.root / "policy.json").write_text(json.dumps({"regularization": reg}))
    for step in range(1, 31):
        run.log({"kind": "step", "step": step, "ce": 5.0 - step / 30, "kl": 0.02,
                 "kl_own": 0.01 if step > 1 else None, "lam_kl_by_domain": {"toxic": 0.2},
                 "head_value": {"toxicity": 0.6}})  # fmt: skip
    plot_run(run)
    png = run.root / "plots" / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
