""":func:`train`, the whole run: prepare the data, then run the job plan, one stage at a time.

The plan — which jobs, with which indices, in which order — is :mod:`attrctl.train.plan`; this
module runs it. A stage of one job runs in this process (on every rank under torchrun); a stage
of several jobs (the parallel schedule) runs them at the same time, one process each
(:func:`run_roles`), and this process alone publishes their results.

Every job is skipped when the manifest already lists it: a resumed run (or a fresh ``train`` into
the same run directory with the same policy) goes straight to the first unfinished job. A job
whose inputs are not published stops the run naming them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from attrctl.errors import AttrctlError, Interrupted
from attrctl.faults import fault
from attrctl.paths import atomic_write
from attrctl.policy.compile import CompiledPolicy, compile_policy
from attrctl.policy.schema import Policy
from attrctl.policy.show import resolved_dict
from attrctl.train import distributed as dist
from attrctl.train.context import StopRequest, TrainContext
from attrctl.train.finetune import finetune_job
from attrctl.train.fit import fit_job
from attrctl.train.lambdas import auto_lambdas
from attrctl.train.plan import FinetuneJob, FitJob, Job, SampleJob, missing_inputs, plan, plan_mode
from attrctl.train.rundir import RunDir, write_json
from attrctl.train.sample import sample_job

ROLES = ("sample", "fit", "finetune")


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    state: dict[str, Any]
    seconds: float


def fingerprint_text(policy: Policy) -> str:
    """What identifies a run's policy: everything but where it runs (output_dir, roles) and how
    many iterations it runs (a run extended with more iterations is the same run)."""
    return _fingerprint_text(policy, legacy=False)


def _fingerprint_text(policy: Policy, legacy: bool) -> str:
    data = resolved_dict(policy)
    data.pop("output_dir", None)
    data.get("schedule", {}).pop("roles", None)
    if not legacy:  # more iterations extend a run: the same jobs come first (runs made before
        data.get("schedule", {}).pop("iterations", None)  # this rule hashed them: legacy=True)
    # Settings that do not change a regularized run stay out of its fingerprint, so runs made
    # before `finetune.objective` existed still resume.
    ft = data.get("finetune", {})
    reg = data.get("regularization", {})
    if not reg.get("own_samples", {}).get("lam"):  # off: runs from before the term still resume
        reg.pop("own_samples", None)
    if ft.get("objective") != "rl":
        ft.pop("rl", None)
    if ft.get("objective") == "regularized":
        ft.pop("objective")
    return yaml.safe_dump(data, sort_keys=True)


def train(
    policy: Policy, *, resume: bool = False, progress: Any = None, out: str | None = None
) -> TrainResult:
    """Run (or continue) the whole schedule of a policy into its run directory.

    Args:
        policy: a validated policy.
        resume: require an existing run in the directory and continue it.
        progress: a progress reporter (``attrctl.train.progress.RichProgress``) or None.
        out: run directory (default ``policy.output_dir`` or ``runs/<name>``).

    Raises:
        AttrctlError: the directory holds another policy's run or is in use, a checkpoint is
            corrupt, the data is empty, ...
    """
    start = time.perf_counter()
    root = Path(out or policy.run_dir).expanduser().resolve()
    policy = policy.model_copy(update={"output_dir": str(root)})
    rank, world = dist.init_from_env(policy.schedule.role("finetune").device)
    run = RunDir(root)
    if rank == 0:
        run.claim(
            fingerprint_text(policy), resume=resume,
            meta={"policy_name": policy.name, "seed": policy.seed, "world": world},
            legacy=_fingerprint_text(policy, legacy=True),
        )  # fmt: skip
    try:  # a failure before the main try below must still give the run directory up
        trained = _check_iterations(run, policy.schedule.iterations) if rank == 0 else 0
        if rank == 0:
            write_json(root / "policy.json", resolved_dict(policy))
            with atomic_write(root / "policy.yaml") as fh:  # a resume reads it: never half of it
                yaml.safe_dump(resolved_dict(policy), fh, sort_keys=False, allow_unicode=True)
        ctx = TrainContext(compiled=compile_policy(policy), run=run, rank=rank, world=world,
                           progress=progress)  # fmt: skip
    except BaseException:
        run.release()
        raise
    handlers = StopRequest.install()
    try:
        _prepare_data(ctx)
        ctx.mixture()  # every data source loads (or fails, naming it) before any job starts
        mode = plan_mode(policy, world)
        if mode == "baseline" and policy.finetune.objective == "filter":
            _record_filter(ctx)
        elif mode != "baseline":
            ctx.compiled = _resolve_lambdas(ctx)
        if mode == "sequential" and policy.schedule.mode == "parallel" and ctx.writer:
            print("attrctl train: under torchrun the parallel schedule runs its jobs one "
                  "after another (each job already uses every rank)", file=sys.stderr)  # fmt: skip
        for stage in plan(mode, policy.schedule.iterations):
            if len(stage) == 1:
                _run(ctx, stage[0])
            else:
                _run_stage(ctx, stage)
        if ctx.writer and _final_iteration(run, trained) != policy.schedule.iterations:
            from attrctl.train.final_model import save_final

            save_final(ctx)  # fresh, or a run extended with more iterations
            run.publish("final", {"iteration": policy.schedule.iterations})
        if ctx.writer:
            from attrctl.train.plots import plot_run

            plot_run(run)
    except KeyboardInterrupt as err:  # SIGINT/SIGTERM outside the fine-tune loop
        raise Interrupted(
            f"stopped ({err or 'SIGINT'}); finished jobs are kept. Continue with: attrctl train "
            f"--resume {root}"
        ) from None
    finally:
        StopRequest.in_loop = False
        StopRequest.restore(handlers)
        if ctx.writer:
            run.release()
    return TrainResult(run_dir=root, state=run.state(), seconds=time.perf_counter() - start)


def _check_iterations(run: RunDir, iterations: int) -> int:
    """How many iterations the run has trained; it may be extended, never cut below that."""
    jobs = run.state()["jobs"]
    indices = (j.removeprefix("finetune/") for j in jobs if j.startswith("finetune/"))
    done = [int(i) for i in indices if i.isdigit()]
    trained = max(done, default=0)
    if trained > iterations:
        raise AttrctlError(
            f"{run.root} has trained {trained} iterations; schedule.iterations={iterations} "
            "would drop some. Use a number ≥ that (more iterations extend the run)"
        )
    return trained


def _final_iteration(run: RunDir, trained_at_start: int) -> int | None:
    """Which θ_i ``model/final`` holds: the manifest's ``final`` record, or — in a run made
    before that record existed — the last θ trained when this start began; None: not saved."""
    rec = run.done("final")
    if rec is not None:  # a damaged record: save model/final again
        return rec.get("iteration") if isinstance(rec, dict) else None
    return trained_at_start if (run.root / "model" / "final").exists() else None


# ------------------------------------------------------------------------------------ data
def _prepare_data(ctx: TrainContext) -> None:
    """Synthesize missing toxic-domain data (resumable) before any job reads the mixture."""
    from attrctl.data.sources import synth_path
    from attrctl.data.synth import synthesize
    from attrctl.policy.schema import SynthSource

    if ctx.writer:
        for src in ctx.policy.data:
            if isinstance(src, SynthSource):
                report = synthesize(ctx.policy, source=src, progress=ctx.progress is not None)
                if not report.complete:
                    raise AttrctlError(f"{synth_path(src, ctx.policy)}: synthesis incomplete")
    dist.barrier(ctx)


def _resolve_lambdas(ctx: TrainContext) -> CompiledPolicy:
    """λ_d per domain; with ``per_domain: auto`` measured once and recorded in the manifest."""
    if not ctx.compiled.auto_lambdas:
        return ctx.compiled
    rec = ctx.run.done("lambdas")
    if rec is None:
        rec = auto_lambdas(ctx)
        if ctx.writer:
            ctx.run.publish("lambdas", rec)
            ctx.log({"kind": "lambdas", **rec})
    dist.barrier(ctx)
    rec = ctx.run.done("lambdas") or rec
    return dataclasses.replace(ctx.compiled, lam_by_domain=dict(rec["lam_by_domain"]))


def _record_filter(ctx: TrainContext) -> None:
    """``filter`` objective: publish how many flagged synth rows the mixture dropped."""
    if ctx.run.done("filter") is not None or not ctx.writer:
        return
    rows = [
        {"source": s.label, "domain": s.domain, "kept": len(s.examples), "dropped": s.dropped}
        for s in ctx.mixture().sources
    ]
    rec = {
        "dropped": sum(r["dropped"] for r in rows),
        "kept": sum(r["kept"] for r in rows),
        "by_source": rows,
        "rule": "a synth row is dropped when any attribute's score ≥ its max_violation",
        "max_violation": {a.name: a.target.max_violation for a in ctx.compiled.attributes},
    }
    ctx.run.publish("filter", rec)
    ctx.log({"kind": "filter", **rec})


# ------------------------------------------------------------------------------------ jobs
def _run_stage(ctx: TrainContext, stage: list[Job]) -> None:
    """The jobs of one stage at the same time, one process each (the parallel schedule)."""
    todo = [job for job in stage if ctx.run.done(job.name) is None]
    if not todo:
        return
    iteration = max(job.i for job in stage if isinstance(job, FinetuneJob))
    t0 = time.perf_counter()
    results = run_roles(ctx, todo, iteration=iteration)
    failed = [res["error"] for res in results if "error" in res]
    for job, res in zip(todo, results, strict=True):
        if "error" not in res:  # kept even when another role failed: a resume skips it
            _publish(ctx, job, res)
    if failed:
        raise AttrctlError(
            "parallel role(s) failed: " + "; ".join(failed) + ". The roles that finished are "
            f"kept; continue with: attrctl train --resume {ctx.run.root}"
        )
    walls = {job.role: res["wall_s"] for job, res in zip(todo, results, strict=True)}
    ctx.log({"kind": "parallel_iteration", "iteration": iteration, "role_wall_s": walls,
             "critical_path_s": max(walls.values()),
             "sequential_sum_s": sum(walls.values()),
             "wall_s": time.perf_counter() - t0})  # fmt: skip


def _run(ctx: TrainContext, job: Job) -> None:
    """Run one job in this process unless the manifest already lists it; then publish it."""
    if ctx.run.done(job.name) is not None:
        return
    settings = ctx.policy.schedule.role(job.role)
    threads = _set_threads(settings.threads)
    t0 = time.perf_counter()
    try:
        res = run_job(ctx, job)
    finally:
        _set_threads(threads)
    res["wall_s"] = time.perf_counter() - t0
    _publish(ctx, job, res)
    dist.barrier(ctx)
    if StopRequest.requested:  # SIGINT/SIGTERM during the job's last step: it is kept, and the
        raise Interrupted(  # run stops here rather than carrying the request into the next job
            f"stopped after {job.name}; finished jobs are kept. Continue with: "
            f"attrctl train --resume {ctx.run.root}"
        )


def run_job(ctx: TrainContext, job: Job) -> dict[str, Any]:
    """Run ``job`` once its inputs are published; its result record (not yet published)."""
    missing = missing_inputs(job, ctx.run.state()["jobs"])
    if missing:
        raise AttrctlError(
            f"{ctx.run.root}: {job.name} ({job}) needs {', '.join(missing)}, not published in "
            "state.json — the run directory was changed outside attrctl, or the job was started "
            "out of its plan's order"
        )
    if isinstance(job, SampleJob):
        return sample_job(ctx, job.i)
    if isinstance(job, FitJob):
        return fit_job(ctx, job.i, job.samples)
    if ctx.policy.finetune.objective == "rl":
        from attrctl.train.rl import rl_job  # imports TRL: only runs that use it pay for it

        return rl_job(ctx, job.i)
    assert isinstance(job, FinetuneJob)
    return finetune_job(ctx, job.i, job.heads)


def _publish(ctx: TrainContext, job: Job, res: dict[str, Any]) -> None:
    if not ctx.writer:
        return
    ctx.log({"kind": job.role, "job": job.name, **res})
    ctx.run.publish(job.name, res)
    fault("publish", job=job.name)
    if isinstance(job, FinetuneJob):
        import shutil

        shutil.rmtree(ctx.run.checkpoint(job.i), ignore_errors=True)  # θ_i is published
    if isinstance(job, FinetuneJob | SampleJob):
        from attrctl.train.plots import plot_run

        plot_run(ctx.run)


def _set_threads(n: int | None) -> int:
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    return before


# ------------------------------------------------------------------------------------ roles
def run_roles(ctx: TrainContext, jobs: list[Job], iteration: int) -> list[dict]:
    """Run jobs at the same time, one process each; wait for all; return their results.

    Each process reads the resolved policy and what the manifest lists, writes its output and a
    result file; this process alone publishes them (one manifest writer). A failed role's result
    is ``{"error": <its exit code and the tail of its log>}``; the caller publishes the others.
    """
    folder = ctx.run.root / ".roles"
    folder.mkdir(exist_ok=True)
    procs = []
    for job in jobs:
        settings = ctx.policy.schedule.role(job.role)
        env = dict(os.environ)
        if settings.threads:
            env["OMP_NUM_THREADS"] = str(settings.threads)
        name = f"{job.role}_{job.i}"
        for suffix in (".json", ".status.json"):
            (folder / f"{name}{suffix}").unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "attrctl.train.role", str(ctx.run.root), job.to_json(),
               str(iteration)]  # fmt: skip
        log = (folder / f"{name}.log").open("w")
        procs.append((name, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)))
    try:
        if ctx.progress is not None:
            ctx.progress.watch_roles(folder, [n for n, _ in procs], [p for _, p in procs])
        codes = [proc.wait() for _, proc in procs]
    except BaseException:  # interrupted: stop the roles too (the fine-tune checkpoints first)
        for _, proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for _, proc in procs:
            proc.wait()
        raise
    results = []
    for (name, _), code in zip(procs, codes, strict=True):
        out = folder / f"{name}.json"
        if code != 0 or not out.exists():
            tail = (folder / f"{name}.log").read_text(errors="replace").strip().splitlines()[-5:]
            results.append({"error": f"{name} (exit {code}): " + " | ".join(tail)})
        else:
            results.append(json.loads(out.read_text()))
    return results
