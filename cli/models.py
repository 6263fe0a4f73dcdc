"""``attrctl models``: inspect the models a policy can name."""

from __future__ import annotations

import json

import typer

app = typer.Typer(help="Inspect base models (bundled, tiny-random, hub ids, local folders).")

SPEC_HELP = "bundled:smollm2-135m-instruct, tiny-random, a hub id, or a local folder."


@app.command("info")
def info(
    spec: str = typer.Argument(..., help=SPEC_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as a JSON object."),
) -> None:
    """Load a model and print its architecture, size, vocabulary, dtype and source."""
    from attrctl.models import load_model

    desc = load_model(spec).describe()
    if as_json:
        typer.echo(json.dumps(desc, indent=2))
        return
    desc["parameters"] = f"{desc['parameters'] / 1e6:.1f}M ({desc['parameters']:,})"
    for key in ("vocab_size", "tokenizer_size"):
        desc[key] = f"{desc[key]:,}"
    for key, value in desc.items():
        typer.echo(f"{key:<16} {value}")


@app.command("ls")
def ls() -> None:
    """List the built-in model specs and whether each is ready to load offline."""
    from attrctl.models.status import builtin_models

    for row in builtin_models():
        typer.echo(f"{row['spec']:<32} {row['status']:<10} {row['detail']}")
