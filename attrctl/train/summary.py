"""The closing summary of ``attrctl train``: its facts, read from the run directory, and the lines printed."""

from __future__ import annotations

from typing import Any

from attrctl.train.rundir import RunDir


def summary(run: RunDir) -> dict[str, Any]:
    """The facts of the closing summary, from the manifest."""
    jobs = run.state()["jobs"]
    samples = sorted((int(k.split("/")[1]), v) for k, v in jobs.items() if k.startswith("sample/"))
    fits = sorted((int(k.split("/")[1]), v) for k, v in jobs.items() if k.startswith("fit/"))
    tunes = sorted((int(k.split("/")[1]), v) for k, v in jobs.items() if k.startswith("finetune/"))
    role_time: dict[str, float] = {}
    for k, v in jobs.items():
        role = k.split("/")[0]
        if "wall_s" in v:
            role_time[role] = role_time.get(role, 0.0) + v["wall_s"]
    last_heads = fits[-1][0] if fits else None
    par = [r for r in run.read_metrics() if r.get("kind") == "parallel_iteration"]
    return {
        "run_dir": str(run.root),
        "model": str(run.model("final")),
        "heads": str(run.heads(last_heads)) if last_heads is not None else None,
        "before": samples[0][1] if samples else None,
        "after": samples[-1][1] if len(samples) > 1 else None,
        "fits": [v for _, v in fits],
        "finetunes": [v for _, v in tunes],
        "role_seconds": role_time,
        "lambdas": jobs.get("lambdas"),
        "filter": jobs.get("filter"),
        "parallel": {
            "critical_path_s": sum(r["critical_path_s"] for r in par),
            "sequential_sum_s": sum(r["sequential_sum_s"] for r in par),
        }
        if par
        else None,
        "plot": str(run.root / "plots" / "training.png"),
    }


def summary_lines(result: Any) -> list[str]:
    """The one-screen summary printed at the end of ``attrctl train``."""
    s = summary(RunDir(result.run_dir))
    lines = [f"run directory   {s['run_dir']}  ({result.seconds / 60:.1f} min)"]
    lines.append(f"model           {s['model']}  (transformers folder)")
    if s["heads"]:
        lines.append(f"heads           {s['heads']}")
    if s["lambdas"]:
        lams = ", ".join(f"{d} {v:.3g}" for d, v in s["lambdas"]["lam_by_domain"].items())
        lines.append(f"λ (auto)        {lams}")
    before, after = s["before"], s["after"]
    if before and after:
        for name, b in before["violation_rate"].items():
            a = after["violation_rate"][name]
            lines.append(
                f"violation rate  {name}: {b:.3f} → {a:.3f} (oracle, samples S_0 → S_final)"
            )
        if "judge_violation_rate" in before and "judge_violation_rate" in after:
            lines.append(
                f"                judge (jigsaw_bilstm): {before['judge_violation_rate']:.3f} → "
                f"{after['judge_violation_rate']:.3f}"
            )
    for f in s["fits"]:
        for name, m in f.get("heads", {}).items():
            head = f"head R_{f['iteration']} {name:<8}"
            if m["held_out"] == 0:  # too few prompts to hold any out
                split = f.get("held_out") or {}
                lines.append(f"{head} AUC not measured ({split.get('note', 'none held out')})")
                continue
            auc = "n/a (one class)" if m["auc"] != m["auc"] else f"{m['auc']:.3f}"  # NaN
            on = (
                f"on {m['held_out_prompts']} held-out prompts ({m['held_out']} sequences)"
                if "held_out_prompts" in m
                else f"on {m['held_out']} held-out sequences"  # a run of an earlier version
            )
            lines.append(f"{head} AUC {auc}, accuracy {m['accuracy']:.3f}, BCE {m['bce']:.3f} {on}")
    objective = s["finetunes"][0].get("objective", "regularized") if s["finetunes"] else None
    if objective not in (None, "regularized"):
        lines.append(f"objective       {objective} (a baseline: no heads fitted, λ not used)")
    if s["filter"]:
        lines.append(
            f"filter          dropped {s['filter']['dropped']} flagged synth rows, kept "
            f"{s['filter']['kept']} examples"
        )
    for t in s["finetunes"]:
        if t.get("objective") == "rl":
            first, last = t.get("reward_first"), t.get("reward_last")
            reward = (
                f"{first:.3f} → {last:.3f}" if first is not None and last is not None else "n/a"
            )
            kl = f", KL {t['kl_last']:.4f}" if t.get("kl_last") is not None else ""
            lines.append(f"θ_{t['iteration']}             reward {reward}{kl} (TRL GRPO)")
            continue
        lines.append(
            f"θ_{t['iteration']}             CE {t['ce_first']:.3f} → {t['ce_last']:.3f}, "
            f"KL {t['kl_last']:.4f} (heads R_{t['heads']})"
        )
    times = ", ".join(f"{r} {v:.0f} s" for r, v in s["role_seconds"].items())
    lines.append(f"time per role   {times}")
    if s["parallel"]:
        lines.append(
            f"parallel        critical path {s['parallel']['critical_path_s']:.0f} s (max of the "
            f"roles per iteration) vs {s['parallel']['sequential_sum_s']:.0f} s run one by one"
        )
    lines.append(f"plots           {s['plot']}")
    return lines
