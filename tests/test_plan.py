"""The job plan (``attrctl.train.plan``): both schedules' index rules in one function, every job's
inputs published by an earlier stage, and a job started without its inputs refused by name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from attrctl.errors import AttrctlError
from attrctl.train.plan import (
    FinetuneJob,
    FitJob,
    SampleJob,
    describe,
    job_from_json,
    missing_inputs,
    plan,
    plan_for,
    plan_mode,
)

MODES = ("sequential", "parallel", "baseline")


def test_sequential_plan_reads_the_samples_and_heads_of_its_own_iteration():
    text = describe(plan("sequential", 3))
    print(text)
    assert text == "\n".join([
        " 1. sample S_0 from θ_0",
        " 2. fit R_1 on S_0",
        " 3. fine-tune θ_1 from θ_0 with R_1",
        " 4. sample S_1 from θ_1",
        " 5. fit R_2 on S_1",
        " 6. fine-tune θ_2 from θ_1 with R_2",
        " 7. sample S_2 from θ_2",
        " 8. fit R_3 on S_2",
        " 9. fine-tune θ_3 from θ_2 with R_3",
        "10. sample S_3 from θ_3",
    ])  # fmt: skip


def test_parallel_plan_runs_three_jobs_per_stage_on_the_previous_iteration():
    stages = plan("parallel", 3)
    print(describe(stages))
    assert stages == [
        [SampleJob(0), FitJob(1, samples=None), FinetuneJob(1, heads=None)],
        [SampleJob(1), FitJob(2, samples=0), FinetuneJob(2, heads=1)],
        [SampleJob(2), FitJob(3, samples=1), FinetuneJob(3, heads=2)],
        [SampleJob(3)],
    ]


def test_the_plan_docs_design_prints_is_the_plan():
    """docs/design.md shows `python -m attrctl.train.plan parallel 3`: the text must be the
    plan's, so the index rules stated there are the ones the code runs."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text()
    block = re.search(r"`python -m attrctl.train.plan parallel 3` prints a plan:\n\n```\n(.*?)```",
                      doc, re.S)  # fmt: skip
    assert block, "docs/design.md should show the parallel plan for I = 3"
    assert block.group(1).rstrip("\n") == describe(plan("parallel", 3))


@pytest.mark.parametrize(
    ("objective", "mode", "world", "expected"),
    [
        ("regularized", "sequential", 1, "sequential"),
        ("regularized", "parallel", 1, "parallel"),
        ("regularized", "parallel", 2, "sequential"),  # under torchrun: one job at a time
        ("sft", "parallel", 1, "baseline"),
        ("rl", "sequential", 1, "baseline"),
    ],
)
def test_a_policy_gets_its_plan_from_one_function(tmp_path, objective, mode, world, expected):
    from test_train import write_policy

    from attrctl.policy import load_policy

    iterations = 3
    path = write_policy(tmp_path, finetune__objective=objective,
                        schedule={"mode": mode, "iterations": iterations})  # fmt: skip
    policy = load_policy(path)
    assert plan_mode(policy, world) == expected
    assert plan_for(policy, world) == plan(expected, iterations)


def test_baseline_plan_has_no_fit_and_no_heads():
    stages = plan("baseline", 3)
    jobs = [j for stage in stages for j in stage]
    assert jobs == [SampleJob(0), FinetuneJob(1, heads=None), FinetuneJob(2, heads=None),
                    FinetuneJob(3, heads=None), SampleJob(3)]  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
def test_every_input_is_published_by_an_earlier_stage_and_every_job_once(mode, iterations):
    published: set[str] = set()
    names = []
    for stage in plan(mode, iterations):
        for job in stage:  # jobs of a stage run at once: none may read another's output
            assert not missing_inputs(job, published), (mode, iterations, str(job))
        names += [job.name for job in stage]
        published |= {job.name for job in stage}
    assert len(names) == len(set(names))
    assert f"finetune/{iterations}" in names and f"sample/{iterations}" == names[-1]
    assert names[0] == "sample/0"


def test_jobs_name_what_they_read():
    assert SampleJob(0).reads() == ()
    assert SampleJob(2).reads() == ("finetune/2",)
    assert FitJob(1, samples=None).reads() == ()
    assert FitJob(3, samples=1).reads() == ("sample/1", "finetune/1")
    assert FinetuneJob(1, heads=None).reads() == ()
    assert FinetuneJob(2, heads=2).reads() == ("finetune/1", "fit/2")


@pytest.mark.parametrize(
    "job", [SampleJob(4), FitJob(2, samples=None), FitJob(2, samples=1), FinetuneJob(3, heads=2)]
)
def test_a_job_travels_to_a_role_process_and_back(job):
    text = job.to_json()
    assert json.loads(text)["role"] == job.role
    assert job_from_json(text) == job


def test_bad_plan_arguments_are_refused():
    with pytest.raises(ValueError, match="iterations"):
        plan("sequential", 0)
    with pytest.raises(ValueError, match="mode"):
        plan("staggered", 1)  # type: ignore[arg-type]


def test_a_job_whose_inputs_are_not_published_stops_naming_them(tmp_path):
    """No silent zero heads or base weights: the fine-tune of θ_2 with R_2 in an empty run
    directory names θ_1 and R_2; the fit of R_1 on S_0 names S_0; a fit on S_1 names θ_1."""
    from test_train import write_policy

    from attrctl.policy import compile_policy, load_policy
    from attrctl.train.context import TrainContext
    from attrctl.train.rundir import RunDir
    from attrctl.train.schedules import run_job

    ctx = TrainContext(compile_policy(load_policy(write_policy(tmp_path))), RunDir(tmp_path / "r"))
    with pytest.raises(AttrctlError, match=r"finetune/2 .*needs finetune/1, fit/2, not published"):
        run_job(ctx, FinetuneJob(2, heads=2))
    with pytest.raises(AttrctlError, match=r"fit/1 .*needs sample/0, not published"):
        run_job(ctx, FitJob(1, samples=0))
    ctx.run.publish("sample/1", {"iteration": 1})  # S_1 without θ_1: its features need θ_1
    with pytest.raises(AttrctlError, match=r"fit/2 .*needs finetune/1, not published"):
        run_job(ctx, FitJob(2, samples=1))
