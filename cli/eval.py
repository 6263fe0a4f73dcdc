"""``attrctl eval``: attribute control, utility and generation quality of a run or a model."""

from __future__ import annotations

from pathlib import Path

import typer

from attrctl.eval.settings import EvalSettings

D = EvalSettings()  # the defaults live on EvalSettings

HELP = """Evaluate a finished training run (RUN_DIR) or any model (MODEL: hub id, local folder, bundled:..., tiny-random).

Attribute control: k continuations of every held-out prompt (RealToxicityPrompts protocol), scored by the policy's oracles and by the independent judge (jigsaw_bilstm); expected maximum violation, violation probability, mean and fraction ≥ threshold, with 95% bootstrap intervals over prompts. Utility: held-out Shakespeare perplexity and zero-shot BIG-bench accuracy (after attrctl assets fetch bigbench). Generation quality: perplexity of the continuations under the base model, distinct-1/2/3.

Results: RUN_DIR/eval.json (eval_guided.json with --guided), or runs/eval/<model>/eval.json; --out overrides.

\b
    attrctl eval runs/toxicity
    attrctl eval bundled:smollm2-135m-instruct --policy toxicity
    attrctl eval bundled:smollm2-135m-instruct --guided runs/toxicity
"""


def eval_command(
    target: str = typer.Argument(..., metavar="RUN_DIR|MODEL", help="Run directory or model."),
    policy: str = typer.Option(
        None, "--policy", "-p", help="Policy whose oracles score (default: the run's; toxicity)."
    ),
    guided: Path = typer.Option(
        None, "--guided", help="Decode with the heads of this finished run (NADO decoding)."
    ),
    prompts: Path = typer.Option(
        None, "--prompts", help="Prompt file (one per line) replacing the held-out prompt sets."
    ),
    k: int = typer.Option(D.k, "--k", "-k", help="Continuations per prompt."),
    top_p: float = typer.Option(D.top_p, "--top-p", help="Nucleus sampling mass."),
    max_new_tokens: int = typer.Option(
        D.max_new_tokens, "--max-new-tokens", help="Tokens per continuation."
    ),
    seed: int = typer.Option(
        None, "--seed", help="Sampling and bootstrap seed (default: policy's)."
    ),
    ppl_tokens: int = typer.Option(
        D.ppl_tokens, "--ppl-tokens", help="Held-out Shakespeare tokens for perplexity (0: skip)."
    ),
    ppl_window: int = typer.Option(
        None, "--ppl-window", help="Perplexity window in tokens (default: finetune.seq_len)."
    ),
    mc_examples: int = typer.Option(
        D.mc_examples, "--mc-examples", help="BIG-bench examples per task at most (0: skip)."
    ),
    mc_tasks: str = typer.Option(
        ",".join(D.mc_tasks), "--mc-tasks", help="BIG-bench tasks, comma-separated."
    ),
    gen_ppl_rows: int = typer.Option(
        D.gen_ppl_rows,
        "--gen-ppl-rows",
        help="Continuations scored for generation perplexity under the base model, at most "
        "(an even spread; 0: skip).",
    ),
    device: str = typer.Option(D.device, "--device", help="Torch device (cpu, cuda, ...)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder (or .json file)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    from rich.console import Console

    from attrctl.eval import run_eval, summary_lines
    from attrctl.train import RichProgress

    settings = EvalSettings(
        k=k, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
        prompts=str(prompts) if prompts else None, ppl_tokens=ppl_tokens, ppl_window=ppl_window,
        mc_examples=mc_examples, mc_tasks=tuple(t.strip() for t in mc_tasks.split(",") if t.strip()),
        gen_ppl_rows=gen_ppl_rows, device=device,
    )  # fmt: skip
    progress = None if quiet else RichProgress(Console(stderr=True))
    done = run_eval(target, policy=policy, guided=str(guided) if guided else None,
                    settings=settings, out=out, progress=progress)  # fmt: skip
    for line in summary_lines(done.result):
        typer.echo(line)
    if done.replaced_settings:
        typer.secho(f"replaced an earlier result with other settings "
                    f"({', '.join(done.replaced_settings)})", err=True, fg=typer.colors.YELLOW)  # fmt: skip
    typer.echo(f"results         {done.path}")


def register(app: typer.Typer) -> None:
    app.command("eval", help=HELP)(eval_command)
