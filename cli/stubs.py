"""Commands whose capability is not built yet: each says so and exits non-zero (3).

``train`` already reads and validates its policy (with ``--set`` overrides), so a user finds
policy mistakes now rather than after the training loop lands.
"""

from __future__ import annotations

import typer

from attrctl.policy import load_policy

_NOT_BUILT = {
    "eval": "evaluation of toxicity, perplexity and utility",
    "export": "HF-format export of a trained run",
    "generate": "generation, plain or NADO-guided",
}
NOT_BUILT_EXIT = 3


def _not_built(name: str, what: str) -> None:
    typer.secho(
        f"attrctl {name}: {what} is not built yet in this version of attrctl.",
        err=True,
        fg=typer.colors.YELLOW,
    )
    raise typer.Exit(NOT_BUILT_EXIT)


def train(
    policy: str = typer.Option("toxicity", "--policy", "-p", help="Bundled policy name or file."),
    overrides: list[str] = typer.Option([], "--set", help="Override a policy field (key=value)."),
) -> None:
    """(not built yet) Regularized fine-tuning: sample → label → fit heads → fine-tune."""
    load_policy(policy, overrides)  # validate now: a bad policy exits 2 with its problems
    _not_built("train", "regularized fine-tuning (sample → label → fit heads → fine-tune)")


def _stub(name: str, what: str):
    def command(ctx: typer.Context) -> None:
        _not_built(name, what)

    command.__doc__ = f"(not built yet) {what[0].upper()}{what[1:]}."
    return command


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    for name, what in _NOT_BUILT.items():
        app.command(
            name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
        )(_stub(name, what))
