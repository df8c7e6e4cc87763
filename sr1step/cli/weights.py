"""`sr1step weights ...`."""

from __future__ import annotations

import typer

from sr1step.errors import Sr1stepError

weights_app = typer.Typer(help="List, download, verify, convert and publish model weights.", no_args_is_help=True)


@weights_app.command("list")
def _not_available() -> None:
    """Not available yet in this version."""
    raise Sr1stepError("'sr1step weights' is not available yet in this version of sr1step")


def register(app: typer.Typer) -> None:
    app.add_typer(weights_app, name="weights")
