"""One output sink for every command: data to stdout, progress/logs/errors to stderr.

Modes: ``human`` (rich tables and progress bars), ``quiet`` (errors only) and ``json`` (one JSON record per
result on stdout, nothing else there).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console


class Output:
    def __init__(self, quiet: bool = False, json_mode: bool = False) -> None:
        self.json_mode = json_mode
        self.quiet = quiet or json_mode
        self.stdout = Console(file=sys.stdout, soft_wrap=True)
        self.stderr = Console(file=sys.stderr, soft_wrap=True)

    @property
    def show_progress(self) -> bool:
        return not self.quiet

    def info(self, message: str) -> None:
        if not self.quiet:
            self.stderr.print(message, highlight=False)

    def warn(self, message: str) -> None:
        self.stderr.print(f"[yellow]warning:[/yellow] {message}", highlight=False)

    def error(self, message: str) -> None:
        self.stderr.print(f"[red]error:[/red] {message}", highlight=False, markup=True)

    def record(self, data: dict[str, Any]) -> None:
        """A machine-readable result: printed as one JSON line in --json mode, ignored otherwise."""
        if self.json_mode:
            sys.stdout.write(json.dumps(data, default=str) + "\n")
            sys.stdout.flush()

    def result(self, renderable: Any) -> None:
        """A human-readable result (table, text) on stdout, unless quiet or json."""
        if not self.quiet:
            self.stdout.print(renderable)
