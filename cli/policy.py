"""``attrctl policy``: list, validate, show and create policies."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from attrctl.errors import AttrctlError
from attrctl.policy import load_policy
from attrctl.policy.show import list_bundled, resolved_yaml, validate_files

app = typer.Typer(help="List, validate, show and create policies.", no_args_is_help=True)

SET_HELP = "Override a policy field, e.g. --set finetune.steps=100 (repeatable; value is YAML)."


@app.command("ls")
def ls() -> None:
    """List the bundled policies with their descriptions."""
    for row in list_bundled():
        typer.echo(f"{row['name']:<22} {row['description']}")


@app.command("validate")
def validate(
    files: list[str] = typer.Argument(..., help="Policy files (or bundled names) to check."),
    as_json: bool = typer.Option(False, "--json", help="Print results as a JSON list."),
) -> None:
    """Check policy files; exit 0 only if every one is valid (2 otherwise)."""
    results = validate_files(files)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
    else:
        for res in results:
            if res["valid"]:
                typer.echo(f"ok      {res['file']}")
            else:
                typer.echo(f"INVALID {res['file']}", err=True)
                for problem in res["problems"]:
                    typer.echo(f"  - {problem}", err=True)
    if not all(r["valid"] for r in results):
        raise typer.Exit(2)


@app.command("show")
def show(
    policy: str = typer.Argument(..., help="A bundled policy name (e.g. toxicity) or a file."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Print the fully resolved policy, every default filled in, as YAML."""
    typer.echo(resolved_yaml(load_policy(policy, overrides)), nl=False)


@app.command("new")
def new(
    name: str = typer.Argument(..., help="Name of the new policy (also the default file name)."),
    attribute: str = typer.Option(
        "lexicon",
        "--attribute",
        "-a",
        help="Oracle kind of its attribute (see `attrctl policy kinds`).",
    ),
    out: Path = typer.Option(None, "--out", "-o", help="Where to write it (default: NAME.yaml)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a commented policy template to edit."""
    from attrctl.policy.template import write_template

    path = write_template(name, attribute, out or Path(f"{name}.yaml"), force=force)
    typer.echo(f"wrote {path}; edit it, then run: attrctl policy validate {path}")


@app.command("kinds")
def kinds() -> None:
    """List the oracle kinds a policy may name (built-in and installed plugins)."""
    from attrctl.oracles import oracle_kinds
    from attrctl.policy.template import oracle_spec_class

    for kind in oracle_kinds():
        try:
            doc = (oracle_spec_class(kind).__doc__ or "").strip().splitlines()[0]
        except AttrctlError as err:
            doc = f"(broken plugin: {err})"
        typer.echo(f"{kind:<18} {doc}")


@app.command("reference")
def reference() -> None:
    """Print every policy field with its type, default and description (Markdown)."""
    from attrctl.policy.reference import policy_reference

    typer.echo(policy_reference())
