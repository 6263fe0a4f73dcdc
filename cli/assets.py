"""``attrctl assets``: fetch and list the offline assets (BIG-bench tasks, bundled model)."""

from __future__ import annotations

from pathlib import Path

import typer

from attrctl.errors import AttrctlError

app = typer.Typer(help="Fetch and list offline assets.", no_args_is_help=True)

FETCHABLE = ("bigbench",)


@app.command("fetch")
def fetch(
    what: str = typer.Argument(..., help="Asset to fetch: bigbench."),
    tasks: str = typer.Option(
        None, "--tasks", help="Comma-separated BIG-bench tasks (default: the four utility tasks)."
    ),
    force: bool = typer.Option(False, "--force", help="Fetch again even if already present."),
    archive: Path = typer.Option(
        None, "--archive", help="Use this bigbench-1.0.0.tar.gz instead of downloading it."
    ),
) -> None:
    """Download an asset once into the cache (BIG-bench: evaluation only, never for training)."""
    from attrctl import tasks as bb

    if what not in FETCHABLE:
        raise AttrctlError(f"unknown asset {what!r}; fetchable: {', '.join(FETCHABLE)}")
    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else bb.DEFAULT_TASKS
    rep = bb.fetch_bigbench(names, force=force, archive=archive, progress=True)
    if rep.extracted:
        typer.echo(f"fetched {', '.join(rep.extracted)} in {rep.seconds:.1f} s")
    if rep.skipped:
        typer.echo(f"already present: {', '.join(rep.skipped)} (use --force to refetch)")
    typer.echo(f"BIG-bench tasks are in {rep.dest} (evaluation only: never train on them)")


@app.command("ls")
def ls() -> None:
    """Show which offline assets are present and how to get the missing ones."""
    from attrctl import tasks as bb
    from attrctl.models.status import builtin_models

    for row in builtin_models():
        typer.echo(f"model     {row['spec']:<32} {row['status']:<9} {row['detail']}")
    have = set(bb.fetched_tasks())
    for name in sorted(have | set(bb.DEFAULT_TASKS)):
        status, detail = ("ready", "") if name in have else ("missing", bb.FETCH_HINT)
        typer.echo(f"bigbench  {name:<32} {status:<9} {detail}")
