"""``attrctl pairwise``: which of two models continues held-out prompts better, by an LM judge."""

from __future__ import annotations

import json
from pathlib import Path

import typer

HELP = """Pairwise generation quality: A's win rate over B, judged by a language model.

A and B (run directories or model specs) continue the same held-out prompts with the same seeds; the judge (any causal LM; default the bundled model) is asked which continuation is better, in both orders to cancel its position bias. Before that, the judge must prefer real continuations over their word-shuffled copies clearly more often than chance; otherwise the win rate is marked unusable and the command exits 3.

\b
    attrctl pairwise runs/toxicity bundled:smollm2-135m-instruct
    attrctl pairwise runs/toxicity runs/toxicity_rl --judge ./my-judge-model -k 4
"""


def pairwise(
    a: str = typer.Argument(..., metavar="A", help="Run directory or model spec."),
    b: str = typer.Argument(..., metavar="B", help="Run directory or model spec."),
    judge: str = typer.Option("bundled:smollm2-135m-instruct", "--judge", help="Judge model."),
    k: int = typer.Option(2, "--k", "-k", min=1, help="Continuations per prompt and model."),
    max_new_tokens: int = typer.Option(20, "--max-new-tokens", min=1, help="Tokens each."),
    seed: int = typer.Option(0, "--seed", help="Sampling, shuffling and bootstrap seed."),
    prompts: Path = typer.Option(
        None, "--prompts", help="Prompt file replacing the held-out sets."
    ),
    device: str = typer.Option("cpu", "--device", help="Torch device."),
    out: Path = typer.Option(None, "--out", "-o", help="Write the result to this JSON file."),
) -> None:
    from attrctl.eval.pairwise import describe, run_pairwise

    result = run_pairwise(a, b, judge=judge, k=k, max_new_tokens=max_new_tokens, seed=seed,
                          prompts=str(prompts) if prompts else None, device=device)  # fmt: skip
    for line in describe(result):
        typer.echo(line)
    if out is not None:
        from attrctl.paths import atomic_write

        with atomic_write(out) as fh:
            fh.write(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        typer.echo(f"results         {out}")
    if not result["usable"]:
        raise typer.Exit(3)


pairwise.__doc__ = HELP


def register(app: typer.Typer) -> None:
    app.command("pairwise", help=HELP)(pairwise)
