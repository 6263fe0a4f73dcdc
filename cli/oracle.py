"""``attrctl oracle``: score texts with an oracle and report its throughput."""

from __future__ import annotations

import json

import typer

from attrctl.errors import AttrctlError

app = typer.Typer(help="Score texts with an oracle.", no_args_is_help=True)


@app.command("score")
def score(
    texts: list[str] = typer.Argument(None, help="Texts to score (or use --file)."),
    oracle: str = typer.Option(..., "--oracle", "-o", help="Oracle kind (see `policy kinds`)."),
    file: str = typer.Option(None, "--file", "-f", help="One text per line; '-' reads stdin."),
    labels: list[str] = typer.Option(
        [], "--label", "-l", help="jigsaw_bilstm label(s) to score (repeatable; default toxic)."
    ),
    params: list[str] = typer.Option(
        [], "--param", "-p", help="Oracle parameter KEY=VALUE, value as YAML (repeatable)."
    ),
    as_json: bool = typer.Option(False, "--json", help='Print [{"text", "score"}, ...].'),
) -> None:
    """Print each text's violation score (1 = violates); throughput goes to stderr."""
    from attrctl.oracles.scoring import parse_params, read_texts, score_texts

    if bool(texts) == (file is not None):
        raise AttrctlError("give the texts as arguments or with --file, not both or neither")
    spec_params = parse_params(params) | ({"labels": labels} if labels else {})
    result = score_texts(oracle, read_texts(file) if file else texts, spec_params)
    typer.echo(json.dumps(result.records(), ensure_ascii=False) if as_json else result.table())
    typer.echo(result.summary(), err=True)
