"""Training: the sample → fit → fine-tune iteration, its schedules, the run directory.

- :mod:`attrctl.train.loop` — the fine-tune job: one readable training loop;
- :mod:`attrctl.train.jobs` — the sample and fit jobs;
- :mod:`attrctl.train.rl` — the ``rl`` baseline's fine-tune job (TRL's GRPOTrainer);
- :mod:`attrctl.train.schedules` — sequential and parallel arrangements, and :func:`train`;
- :mod:`attrctl.train.rundir` — atomic state, manifest, metrics, ownership of a run directory;
- :mod:`attrctl.train.distributed` — torchrun / DDP;
- :mod:`attrctl.train.report` — plots and the closing summary.
"""

from __future__ import annotations

from typing import Any


def train(*args: Any, **kwargs: Any):
    """See :func:`attrctl.train.schedules.train`."""
    from attrctl.train.schedules import train as _train

    return _train(*args, **kwargs)


RESUMABLE_OVERRIDES = ("schedule.iterations", "schedule.roles")


def check_resume_overrides(overrides: list[str]) -> None:
    """``--set`` on ``--resume`` may extend the schedule (``schedule.iterations``) or move jobs
    (``schedule.roles.*``); any other change would be another policy's run: refused up front."""
    from attrctl.errors import AttrctlError

    for item in overrides:
        key = item.partition("=")[0].strip()
        if not any(key == k or key.startswith(k + ".") for k in RESUMABLE_OVERRIDES):
            raise AttrctlError(
                f"--set {item}: a resumed run keeps its policy; with --resume only "
                f"{' and '.join(k + '…' for k in RESUMABLE_OVERRIDES)} may change (e.g. --set "
                "schedule.iterations=3 extends a finished run). For other changes start a new run "
                "with -p and another --out"
            )


def RichProgress(*args: Any, **kwargs: Any):
    from attrctl.train.progress import RichProgress as _RichProgress

    return _RichProgress(*args, **kwargs)


def summary_lines(result: Any) -> list[str]:
    """The one-screen summary printed at the end of ``attrctl train``."""
    from attrctl.train.report import summary
    from attrctl.train.rundir import RunDir

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
