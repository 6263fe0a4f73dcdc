"""``attrctl export``: a finished run as a Hugging Face model folder with heads and a card."""

from __future__ import annotations

from pathlib import Path

import typer

HELP = """Export a finished run as a Hugging Face model folder.

OUT gets the run's final model (config.json, model.safetensors, tokenizer files, generation_config.json; LoRA merged), loadable with AutoModelForCausalLM.from_pretrained and no attrctl installed, plus heads/ (the last fitted regularizer heads), policy.yaml, every eval*.json of the run, and a README.md model card. OUT must not exist: an existing folder is refused and left untouched.

\b
Examples:
    attrctl export runs/toxicity --out exports/toxicity
    attrctl generate exports/toxicity "You are such a" --guided
"""


def export(
    run: Path = typer.Argument(..., help="A finished run directory."),
    out: Path = typer.Option(..., "--out", "-o", help="The folder to create (must not exist)."),
) -> None:
    from attrctl.export import export_run

    res = export_run(run, out)
    typer.echo(f"exported {run} → {res.out} ({len(res.files)} files)")
    typer.echo(f"  heads   {'heads/' if res.heads else 'none (the run fitted no heads)'}")
    typer.echo(f"  evals   {', '.join(res.evals) or 'none'}")
    typer.echo(f"  load    AutoModelForCausalLM.from_pretrained({str(res.out)!r})")


export.__doc__ = HELP


def register(app: typer.Typer) -> None:
    app.command("export", help=HELP)(export)
