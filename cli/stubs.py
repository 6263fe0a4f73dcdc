"""Commands whose capability is not built yet: each says so and exits non-zero (3)."""

from __future__ import annotations

import typer

# Every command is built; a future command that is not yet goes here as name: what it does.
_NOT_BUILT: dict[str, str] = {}
NOT_BUILT_EXIT = 3


def _not_built(name: str, what: str) -> None:
    typer.secho(
        f"attrctl {name}: {what} is not built yet in this version of attrctl.",
        err=True,
        fg=typer.colors.YELLOW,
    )
    raise typer.Exit(NOT_BUILT_EXIT)


def _stub(name: str, what: str):
    def command(ctx: typer.Context) -> None:
        _not_built(name, what)

    command.__doc__ = f"(not built yet) {what[0].upper()}{what[1:]}."
    return command


def register(app: typer.Typer) -> None:
    for name, what in _NOT_BUILT.items():
        app.command(
            name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
        )(_stub(name, what))
