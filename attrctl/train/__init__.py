"""Training: the sample → fit → fine-tune iteration, its schedules, the run directory.

- :mod:`attrctl.train.plan` — the jobs as data (what each reads and publishes) and the order
  each schedule runs them in;
- :mod:`attrctl.train.schedules` — :func:`train`: data preparation, then the plan, stage by stage;
- :mod:`attrctl.train.sample` — the sample job (S_i from θ_i);
- :mod:`attrctl.train.fit` — the fit job (R_i on S_j);
- :mod:`attrctl.train.finetune` — the fine-tune job (θ_i): one readable training loop;
- :mod:`attrctl.train.own_samples` — the fine-tune's KL term on its own continuations;
- :mod:`attrctl.train.rl` — the ``rl`` baseline's fine-tune job (TRL's GRPOTrainer);
- :mod:`attrctl.train.rundir` — atomic state, manifest, metrics, ownership of a run directory;
- :mod:`attrctl.train.distributed` — torchrun / DDP;
- :mod:`attrctl.train.weights` — θ_i's trainable weights (and loading θ_i), the optimizer state;
- :mod:`attrctl.train.final_model` — the run's final model as a transformers folder;
- :mod:`attrctl.train.plots` — the training curves (``plots/training.png``);
- :mod:`attrctl.train.summary` — the closing summary of ``attrctl train``.
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
    """See :func:`attrctl.train.summary.summary_lines`."""
    from attrctl.train.summary import summary_lines as _summary_lines

    return _summary_lines(result)
