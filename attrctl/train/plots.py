"""The training curves of a run: ``plots/training.png``, redrawn after every job."""

from __future__ import annotations

from attrctl.paths import atomic_write
from attrctl.train.rundir import RunDir


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
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    x = list(range(1, len(steps) + 1))  # global step across iterations
    ax = axes[0, 0]
    if rl_steps:  # the rl objective: TRL's mean reward and KL to the reference per step
        xr = list(range(1, len(rl_steps) + 1))
        ax.plot(xr, [r.get("reward", float("nan")) for r in rl_steps], lw=0.8)
        ax.set(title="mean reward Σ_k w_k (1 − score_k)", xlabel="step")
        ax = axes[0, 1]
        ax.plot(xr, [r.get("kl", float("nan")) for r in rl_steps], lw=0.8)
        ax.set(title="KL to the reference (TRL)", xlabel="step")
    else:
        ax.plot(x, [r["ce"] for r in steps], lw=0.8)
        ax.set(title="cross-entropy (per token)", xlabel="step")
        ax = axes[0, 1]
        ax.plot(x, [r["kl"] for r in steps], lw=0.8)
        ax.set(title="KL(q ‖ p) (per token)", xlabel="step")
    ax = axes[0, 2]
    domains = sorted({d for r in steps for d in r.get("lam_kl_by_domain", {})})
    for d in domains:
        ax.plot(x, [r["lam_kl_by_domain"].get(d) or 0.0 for r in steps], lw=0.8, label=d)
    ax.set(title="λ_d · KL by domain", xlabel="step")
    if domains:
        ax.legend()
    ax = axes[1, 0]
    names = sorted({n for r in steps for n in r.get("head_value", {})})
    for n in names:
        ax.plot(x, [r["head_value"].get(n, 0.0) for r in steps], lw=0.8, label=n)
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
