"""The jobs of a run as data, and the order each schedule runs them in.

A run is a list of *stages*; the jobs of a stage may run at the same time (the parallel schedule
runs them as one process each), and every job of a stage reads only what earlier stages
published. Each job names what it reads from the run directory's manifest (``state.json``) and
what it publishes there; :func:`missing_inputs` is the check a job passes before it starts, so
a job whose inputs are not published fails naming them instead of running on a default.

The index rules, all in :func:`plan` (docs/design.md, "Iterations and schedules"):

- sequential, iteration i = 1..I: sample S_{i−1} from θ_{i−1} → fit R_i on S_{i−1} → fine-tune θ_i
  with R_i;
- parallel, iteration i = 1..I, one stage: sample S_{i−1} from θ_{i−1} · fit R_i on S_{i−2} ·
  fine-tune θ_i with R_{i−1}. The first iterations have no samples or heads yet: R_1 is fitted on
  no samples (zero heads, q = p) and θ_1 trains with no heads;
- baselines (``finetune.objective`` sft / filter / rl): S_0, then θ_1..θ_I with no heads;
- every plan ends by sampling S_I from θ_I, so a run reports the violation rate of the base
  model's samples and of the final model's on the same prompts with the same seeds.

``python -m attrctl.train.plan parallel 3`` prints a plan; :func:`plan_for` gives a policy's.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import TYPE_CHECKING, ClassVar, Literal

if TYPE_CHECKING:
    from attrctl.policy.schema import Policy

Mode = Literal["sequential", "parallel", "baseline"]


@dataclasses.dataclass(frozen=True)
class Job:
    """One job: ``role/i`` in the manifest."""

    role: ClassVar[str]
    i: int

    @property
    def name(self) -> str:
        """The manifest key this job publishes."""
        return f"{self.role}/{self.i}"

    def reads(self) -> tuple[str, ...]:
        """The manifest keys that must be published before this job starts."""
        raise NotImplementedError

    def to_json(self) -> str:
        return json.dumps({"role": self.role, **dataclasses.asdict(self)})


def _theta(i: int) -> tuple[str, ...]:
    return (f"finetune/{i}",) if i > 0 else ()  # θ_0 is the base model: nothing to read


@dataclasses.dataclass(frozen=True)
class SampleJob(Job):
    """S_i: continuations of the regularizer prompts sampled from θ_i and scored."""

    role: ClassVar[str] = "sample"

    def reads(self) -> tuple[str, ...]:
        return _theta(self.i)

    def __str__(self) -> str:
        return f"sample S_{self.i} from θ_{self.i}"


@dataclasses.dataclass(frozen=True)
class FitJob(Job):
    """R_i fitted on S_samples (features from θ_samples); ``samples=None``: no samples exist yet
    (the parallel schedule's first iteration), R_i is the zero heads."""

    role: ClassVar[str] = "fit"
    samples: int | None

    def reads(self) -> tuple[str, ...]:
        if self.samples is None:
            return ()
        return (f"sample/{self.samples}", *_theta(self.samples))

    def __str__(self) -> str:
        on = "no samples (zero heads)" if self.samples is None else f"S_{self.samples}"
        return f"fit R_{self.i} on {on}"


@dataclasses.dataclass(frozen=True)
class FinetuneJob(Job):
    """θ_i from θ_{i−1}, regularized by heads R_heads; ``heads=None``: no heads (a baseline's
    plain loss, or the parallel schedule's first iteration)."""

    role: ClassVar[str] = "finetune"
    heads: int | None

    def reads(self) -> tuple[str, ...]:
        heads = () if self.heads is None else (f"fit/{self.heads}",)
        return (*_theta(self.i - 1), *heads)

    def __str__(self) -> str:
        with_ = "no heads" if self.heads is None else f"R_{self.heads}"
        return f"fine-tune θ_{self.i} from θ_{self.i - 1} with {with_}"


JOB_KINDS: dict[str, type[Job]] = {k.role: k for k in (SampleJob, FitJob, FinetuneJob)}


def job_from_json(text: str) -> Job:
    """The job :meth:`Job.to_json` wrote (a parallel role's command line carries it)."""
    data = json.loads(text)
    return JOB_KINDS[data.pop("role")](**data)


def plan(mode: Mode, iterations: int) -> list[list[Job]]:
    """The stages of a run of ``iterations`` iterations under ``mode``, in order."""
    if iterations < 1:
        raise ValueError(f"iterations must be ≥ 1, got {iterations}")
    stages: list[list[Job]] = []
    if mode == "baseline":
        stages.append([SampleJob(0)])
        stages += [[FinetuneJob(i, heads=None)] for i in range(1, iterations + 1)]
    elif mode == "sequential":
        for i in range(1, iterations + 1):
            stages += [[SampleJob(i - 1)], [FitJob(i, samples=i - 1)], [FinetuneJob(i, heads=i)]]
    elif mode == "parallel":
        for i in range(1, iterations + 1):
            stages.append([
                SampleJob(i - 1),
                FitJob(i, samples=i - 2 if i >= 2 else None),
                FinetuneJob(i, heads=i - 1 if i >= 2 else None),
            ])  # fmt: skip
    else:
        raise ValueError(f"unknown schedule mode {mode!r}")
    stages.append([SampleJob(iterations)])
    return stages


def plan_mode(policy: Policy, world: int = 1) -> Mode:
    """Which plan a policy's run follows: a baseline objective has no heads to fit; the parallel
    schedule runs its roles as processes of one machine, so under torchrun it runs sequentially."""
    if policy.finetune.objective != "regularized":
        return "baseline"
    if policy.schedule.mode == "parallel" and world == 1:
        return "parallel"
    return "sequential"


def plan_for(policy: Policy, world: int = 1) -> list[list[Job]]:
    """The job plan of a policy's run on ``world`` ranks: what :func:`attrctl.train.train` runs."""
    return plan(plan_mode(policy, world), policy.schedule.iterations)


def missing_inputs(job: Job, published: set[str] | dict) -> list[str]:
    """What ``job`` reads that is not in ``published`` (the manifest's job keys)."""
    return [key for key in job.reads() if key not in published]


def describe(stages: list[list[Job]]) -> str:
    """One line per stage, jobs of a stage joined by " · " (they may run at the same time)."""
    return "\n".join(
        f"{n:>2}. " + " · ".join(str(j) for j in stage) for n, stage in enumerate(stages, 1)
    )


if __name__ == "__main__":
    print(describe(plan(sys.argv[1], int(sys.argv[2]))))  # type: ignore[arg-type]
