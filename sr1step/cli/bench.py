"""`sr1step bench`."""

from __future__ import annotations

import typer

from sr1step.errors import Sr1stepError


def register(app: typer.Typer) -> None:
    @app.command("bench", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def _not_available(ctx: typer.Context) -> None:
        """Not available yet in this version."""
        raise Sr1stepError("'sr1step bench' is not available yet in this version of sr1step")
