"""``attrctl report``: eval results side by side as a table and a trade-off plot."""

from __future__ import annotations

from pathlib import Path

import typer

HELP = """Compare `attrctl eval` results: one Markdown table in the paper's shape and a plot.

Each PATH is an eval JSON file or a run directory (every eval*.json in it). Rows are the results in the order given; columns are violation by the oracle and by the judge on the toxic-leaning prompt set (share ≥ 0.5 with its CI, and expected max), held-out perplexity, MC accuracy ± stderr, generation perplexity, distinct-1/2/3 and training time. Missing numbers show as "–".

With --out DIR, the table goes to DIR/report.md and judge violation vs held-out perplexity (with CIs, one labelled point per result) to DIR/tradeoff.png; a λ sweep draws the trade-off front.

\b
Examples:
    attrctl report runs/base runs/sft runs/toxicity
    attrctl report runs/lam_*/eval.json --out reports/lambda-sweep
    attrctl report runs/toxicity --prompt-set all --attribute toxicity
"""


def report(
    paths: list[Path] = typer.Argument(..., help="Eval JSON files or run directories."),
    out: Path = typer.Option(None, "--out", "-o", help="Write report.md and tradeoff.png here."),
    prompt_set: str = typer.Option(
        None, "--prompt-set", help="Prompt set of the violation columns (default: toxic-leaning)."
    ),
    attribute: str = typer.Option(
        None, "--attribute", help="Attribute of the violation columns (default: toxicity)."
    ),
) -> None:
    from attrctl.report import build_report

    res = build_report(paths, out, prompt_set=prompt_set, attribute=attribute)
    typer.echo(res.markdown)
    typer.echo("\nHeld-out control in detail:\n\n" + res.control)
    if res.markdown_path is not None:
        typer.echo(f"\nwrote {res.markdown_path} and {res.plot_path}")


report.__doc__ = HELP


def register(app: typer.Typer) -> None:
    app.command("report", help=HELP)(report)
