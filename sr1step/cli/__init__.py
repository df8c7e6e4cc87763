"""The ``sr1step`` command line: assembles the sub-commands and maps errors to one line + exit code."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from sr1step import __version__
from sr1step.errors import Sr1stepError

app = typer.Typer(
    name="sr1step",
    help="One-step diffusion super-resolution: upscale images, distil students, evaluate models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"sr1step {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """One-step diffusion super-resolution."""


def _register() -> None:
    # Each command lives in its own module; importing them here keeps ``sr1step --help`` complete.
    from sr1step.cli import bench, distill, evaluate, upscale, weights

    for module in (upscale, distill, evaluate, weights, bench):
        module.register(app)


_register()


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code: sr1step errors become one stderr line and exit 1."""
    # Typer vendors Click (typer._click); Click's exceptions are the ones a parse error raises.
    from typer._click import exceptions as click_exceptions

    try:
        result = app(args=argv, standalone_mode=False, prog_name="sr1step")
    except Sr1stepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if os.environ.get("SR1STEP_DEBUG"):
            raise
        return 1
    except typer.Exit as exc:
        return exc.exit_code
    except click_exceptions.ClickException as exc:  # usage errors: exit 2
        exc.show()
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())
