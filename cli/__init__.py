"""The ``attrctl`` command line: a thin Typer layer over the library.

Each command group lives in its own module and only parses arguments, calls one library
function and prints. User errors (:class:`attrctl.errors.AttrctlError`) become one clear message
on stderr and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys

import typer

from attrctl.errors import AttrctlError, printable

app = typer.Typer(
    name="attrctl",
    help="Fine-tune language models under attribute-control policies (NADO-regularized KL).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_REGISTERED: list[bool] = []


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    # `--debug` is read from argv in main(): it must also apply to errors raised before or
    # outside a command. Declaring it here makes click accept it and list it in --help.
    del debug


def _register() -> None:
    """Attach the command groups, once. Done on first use rather than at import, so that
    `import attrctl.cli` stays light (some groups import torch)."""
    if _REGISTERED:
        return
    _REGISTERED.append(True)
    from attrctl.cli import assets, bench, data, models, oracle, policy, stubs, train

    app.add_typer(policy.app, name="policy")
    app.add_typer(models.app, name="models")
    app.add_typer(oracle.app, name="oracle")
    app.add_typer(data.app, name="data")
    app.add_typer(assets.app, name="assets")
    app.add_typer(bench.app, name="bench")
    train.register(app)
    from attrctl.cli import eval as eval_cmd

    eval_cmd.register(app)
    from attrctl.cli import export, generate, memory, pairwise, report

    generate.register(app)
    export.register(app)
    memory.register(app)
    pairwise.register(app)
    report.register(app)
    stubs.register(app)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point. Returns the process exit code."""
    _register()
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        # standalone mode: click prints usage errors itself and exits 2; we add AttrctlError.
        app(args=args, standalone_mode=True)
    except AttrctlError as err:
        if debug:
            raise
        typer.secho(f"error: {printable(str(err))}", err=True, fg=typer.colors.RED)
        return err.exit_code
    except SystemExit as ex:
        code = ex.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except Exception as err:
        # A full disk, size limit or read-only folder hit by a write that did not go through
        # attrctl.paths.writing still gets one line, not a traceback; anything else is a bug.
        from attrctl.paths import write_error

        failed = write_error(getattr(err, "filename", None) or "a file attrctl was writing", err)
        if failed is None or debug:
            raise
        typer.secho(f"error: {failed}", err=True, fg=typer.colors.RED)
        return failed.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
