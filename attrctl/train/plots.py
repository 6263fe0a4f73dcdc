"""The training curves of a run: ``plots/training.png``, redrawn after every job.

At batch 8 the per-step values are noisy; each curve is drawn faint as measured and bold as an
exponential moving average (:func:`ema`), and the λ of each term is in its legend.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from attrctl.paths import atomic_write
from attrctl.train.rundir import RunDir

SMOOTHING = 0.9  # EMA weight of the past: about the last 10 steps


def ema(values: Sequence[float], beta: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing): a constant series
    stays constant, and the first point is the first value rather than a pull toward zero.
    A missing value (NaN) stays missing and does not enter the average."""
    out, avg, t = [], 0.0, 0
    for v in values:
        if math.isnan(v):
            out.append(math.nan)
            continue
        t += 1
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**t))
    return out


def lambda_labels(run: RunDir) -> dict[str, Any]:
    """λ per domain (``"*"``: any domain not listed) and λ_own of a run, from its resolved policy
    (and, under ``per_domain: auto``, the measured values in the manifest)."""
    try:
        reg = json.loads((run.root / "policy.json").read_text()).get("regularization", {})
    except (OSError, ValueError):
        return {}
    out: dict[str, Any] = {"*": reg.get("lam", 0.0)}
    per_domain = reg.get("per_domain")
    measured = run.done("lambdas") if per_domain == "auto" else None
    if measured:
        per_domain = measured.get("lam_by_domain")
    if isinstance(per_domain, dict):
        out.update(per_domain)
    own = (reg.get("own_samples") or {}).get("lam") or 0.0
    if own:
        out["own"] = own
    return out


def _curve(ax, x, ys, label: str | None = None, color: str | None = None) -> None:
    """``ys`` faint as measured, with its EMA bold in the same colour."""
    (raw,) = ax.plot(x, ys, lw=0.6, alpha=0.3, color=color)
    ax.plot(x, ema(ys), lw=1.6, color=raw.get_color(), label=label)


def plot_run(run: RunDir) -> None:
    """``plots/training.png``: CE, KL, λ-weighted KL by domain, head value per step; violation
    rate of each sample set S_i; per-role wall time per iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = run.read_metrics()
    steps = [r for r in recs if r.get("kind") == "step"]
    rl_steps = [r for r in recs if r.get("kind") == "rl_step"]
    samples = sorted((r for r in recs if r.get("kind") == "sample"), key=lambda r: r["iteration"])
    if not steps and not samples and not rl_steps:
        return
    lams = lambda_labels(run)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    x = list(range(1, len(steps) + 1))  # global step across iterations
    ax = axes[0, 0]
    if rl_steps:  # the rl objective: TRL's mean reward and KL to the reference per step
        xr = list(range(1, len(rl_steps) + 1))
        _curve(ax, xr, [r.get("reward", float("nan")) for r in rl_steps])
        ax.set(title="mean reward Σ_k w_k (1 − score_k)", xlabel="step")
        ax = axes[0, 1]
        _curve(ax, xr, [r.get("kl", float("nan")) for r in rl_steps])
        ax.set(title="KL to the reference (TRL)", xlabel="step")
    else:
        _curve(ax, x, [r["ce"] for r in steps])
        ax.set(title="cross-entropy (per token; bold: EMA)", xlabel="step")
        ax = axes[0, 1]
        _curve(ax, x, [r["kl"] for r in steps], label="mixture")
        own_steps = [r.get("kl_own") for r in steps]
        if any(v is not None for v in own_steps):
            lam_own = lams.get("own")
            _curve(ax, x, [v if v is not None else float("nan") for v in own_steps],
                   label=f"own continuations (λ_own {lam_own:g})" if lam_own else "own")  # fmt: skip
            ax.legend()
        ax.set(title="KL(q ‖ p) (per token)", xlabel="step")
    ax = axes[0, 2]
    domains = sorted({d for r in steps for d in r.get("lam_kl_by_domain", {})})
    for d in domains:
        lam = lams.get(d, lams.get("*"))
        label = f"{d} (λ {lam:g})" if isinstance(lam, int | float) else d
        _curve(ax, x, [r["lam_kl_by_domain"].get(d) or 0.0 for r in steps], label=label)
    ax.set(title="λ_d · KL by domain", xlabel="step")
    if domains:
        ax.legend()
    ax = axes[1, 0]
    names = sorted({n for r in steps for n in r.get("head_value", {})})
    for n in names:
        _curve(ax, x, [r["head_value"].get(n, 0.0) for r in steps], label=n)
    ax.set(title="mean head value σ(r[y]) (R of the token taken)", xlabel="step")
    if names:
        ax.legend()
    ax = axes[1, 1]
    if samples:
        attrs = sorted(samples[0].get("violation_rate", {}))
        its = [r["iteration"] for r in samples]
        for a in attrs:
            ax.plot(its, [r["violation_rate"][a] for r in samples], "o-", label=f"{a} (oracle)")
        if all("judge_violation_rate" in r for r in samples):
            ax.plot(its, [r["judge_violation_rate"] for r in samples], "s--", label="judge")
        ax.legend()
        ax.set_xticks(its)
    ax.set(title="violation rate of samples S_i", xlabel="model θ_i")
    ax = axes[1, 2]
    roles = ("sample", "fit", "finetune")
    by_iter: dict[int, dict[str, float]] = {}
    for r in recs:
        if r.get("kind") in roles and "wall_s" in r:
            i = r["iteration"] + (1 if r["kind"] == "sample" else 0)
            by_iter.setdefault(i, {})[r["kind"]] = r["wall_s"]
    its = sorted(by_iter)
    bottom = [0.0] * len(its)
    for role in roles:
        vals = [by_iter[i].get(role, 0.0) for i in its]
        ax.bar(its, vals, bottom=bottom, label=role)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set(title="wall time per job (s)", xlabel="iteration")
    if its:
        # S_i is drawn with iteration i + 1, which it starts; the last one ends the run instead.
        ax.set_xticks(its, [str(i) if set(by_iter[i]) - {"sample"} else f"S_{i - 1}" for i in its])
        ax.legend()
    fig.suptitle(f"attrctl run {run.root.name}")
    fig.tight_layout()
    path = run.root / "plots" / "training.png"
    with atomic_write(path, "wb", encoding=None) as fh:
        fig.savefig(fh, format="png", dpi=90)
    plt.close(fig)
