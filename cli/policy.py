"""`attrctl policy` commands (being built)."""

from __future__ import annotations

import typer

app = typer.Typer(help="List, validate, show and create policies.", no_args_is_help=True)
