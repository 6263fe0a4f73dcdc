"""``attrctl train``: regularized fine-tuning under a policy (sample → fit heads → fine-tune)."""

from __future__ import annotations

from pathlib import Path

import typer

from attrctl.errors import AttrctlError

HELP = """Fine-tune the policy's model on its data mixture under the policy's attributes.

Each iteration samples continuations of the regularizer prompts from the current model and labels them with the oracles, fits one NADO head per attribute on them, then fine-tunes with CE + λ_d·KL(q‖p).

Everything lands in the run directory (default runs/<policy name>): the resolved policy, checkpoints, samples, heads, metrics.jsonl, plots/training.png and the final model as a transformers folder (model/final).

\b
Resume an interrupted run (at any moment, even after SIGKILL):
    attrctl train --resume runs/toxicity
Per-role device and threads:
    attrctl train -p toxicity --set schedule.roles.finetune.device=cuda
    attrctl train -p toxicity --set schedule.roles.sample.threads=1
Parallel schedule (an iteration's three jobs as separate processes):
    attrctl train -p toxicity --set schedule.mode=parallel
Several processes with DistributedDataParallel (gloo on CPU, nccl on CUDA):
    torchrun --nproc-per-node 2 -m attrctl.cli train -p toxicity
"""


def train(
    policy: str = typer.Option(
        None, "--policy", "-p", help="Bundled policy name (e.g. toxicity) or YAML file."
    ),
    overrides: list[str] = typer.Option([], "--set", help="Override a policy field (key=value)."),
    resume: Path = typer.Option(
        None,
        "--resume",
        help="Continue the run in this directory (its policy.yaml is used; "
        "--set schedule.iterations=N extends a finished run).",
    ),
    out: Path = typer.Option(None, "--out", "-o", help="Run directory (default runs/<name>)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    from rich.console import Console

    from attrctl.policy import load_policy
    from attrctl.train import RichProgress, check_resume_overrides, summary_lines
    from attrctl.train import train as run_train

    if resume is not None:
        if policy is not None or out is not None:
            raise AttrctlError(
                "--resume continues the run in its folder with that run's own policy.yaml; "
                f"{'-p/--policy' if policy is not None else '--out'} does not apply to it. "
                f"Resume with: attrctl train --resume {resume}"
            )
        check_resume_overrides(overrides)
        pol = load_policy(resume / "policy.yaml", overrides)
        out = resume
    elif policy is None:
        raise AttrctlError(
            "which policy? pass --policy NAME|FILE (e.g. attrctl train --policy toxicity; "
            "attrctl policy ls lists the bundled ones) or --resume RUN_DIR"
        )
    else:
        pol = load_policy(policy, overrides)
    console = Console(stderr=True)
    result = run_train(
        pol, resume=resume is not None, out=str(out) if out else None,
        progress=None if quiet else RichProgress(console),
    )  # fmt: skip
    for line in summary_lines(result):
        typer.echo(line)


train.__doc__ = HELP


def register(app: typer.Typer) -> None:
    app.command("train", help=HELP)(train)
