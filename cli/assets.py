"""`attrctl assets` commands (being built)."""

from __future__ import annotations

import typer

app = typer.Typer(help="assets commands.", no_args_is_help=True)
