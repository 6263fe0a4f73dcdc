"""One job of a parallel stage, run as its own process by
:func:`attrctl.train.schedules.run_roles`.

    python -m attrctl.train.role RUN_DIR JOB_JSON ITERATION

JOB_JSON is :meth:`attrctl.train.plan.Job.to_json` (e.g. ``{"role": "fit", "i": 2, "samples": 0}``).

It reads the run's resolved policy (``policy.yaml``) and only what the manifest lists, runs the job,
and writes its result to ``.roles/<role>_<index>.json``; the parent publishes it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    import torch

    from attrctl.errors import AttrctlError
    from attrctl.faults import fault
    from attrctl.paths import atomic_write
    from attrctl.policy import compile_policy, load_policy
    from attrctl.train.context import StatusFileProgress, StopRequest, TrainContext
    from attrctl.train.plan import job_from_json
    from attrctl.train.rundir import RunDir
    from attrctl.train.schedules import run_job

    try:
        root, job = Path(argv[0]), job_from_json(argv[1])
    except (IndexError, ValueError, KeyError, TypeError) as err:
        print(f"usage: python -m attrctl.train.role RUN_DIR JOB_JSON [ITERATION] ({err!r})",
              file=sys.stderr)  # fmt: skip
        return 2
    role, idx = job.role, job.i
    iteration = argv[2] if len(argv) > 2 else "?"
    folder = root / ".roles"
    StopRequest.install()  # SIGTERM from the parent: a fine-tune checkpoints before it stops
    try:
        fault(f"parallel/{iteration}", role=role)  # a test's proof that the roles overlap
        policy = load_policy(root / "policy.yaml")
        settings = policy.schedule.role(role)
        if settings.threads:
            torch.set_num_threads(settings.threads)
        run = RunDir(root)
        compiled = compile_policy(policy)
        rec = run.done("lambdas")
        if rec is not None:
            import dataclasses

            compiled = dataclasses.replace(compiled, lam_by_domain=dict(rec["lam_by_domain"]))
        ctx = TrainContext(compiled=compiled, run=run,
                           progress=StatusFileProgress(folder / f"{role}_{idx}.status.json"))  # fmt: skip
        t0 = time.perf_counter()
        res = run_job(ctx, job)
        res["wall_s"] = time.perf_counter() - t0
        with atomic_write(folder / f"{role}_{idx}.json") as fh:
            json.dump(res, fh)
    except AttrctlError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
