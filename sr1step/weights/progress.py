"""Rich progress bars on stderr for downloads and hashing, plus a tqdm look-alike for ``hf_hub_download``."""

from __future__ import annotations

import sys
from typing import Any


class TransferProgress:
    """Byte-count progress on stderr, started lazily (a cache hit prints nothing); a no-op when disabled."""

    def __init__(self, enabled: bool) -> None:
        self._bars: Any = None
        self._started = False
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bars = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(file=sys.stderr),
            )

    @property
    def enabled(self) -> bool:
        return self._bars is not None

    def __enter__(self) -> TransferProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            self._bars.stop()
            self._started = False

    def task(self, description: str, total: int | None, completed: int = 0) -> Any:
        """A new bar; returns its handle (None when disabled)."""
        if self._bars is None:
            return None
        if not self._started:
            self._bars.start()
            self._started = True
        return self._bars.add_task(description, total=total, completed=completed)

    def advance(self, task: Any, amount: int) -> None:
        if self._bars is not None and task is not None:
            self._bars.advance(task, amount)

    def tqdm_class(self, label: str) -> type:
        """A class ``hf_hub_download(tqdm_class=...)`` can instantiate; it drives this display.

        huggingface_hub calls a non-tqdm class with ``total``, ``initial``, ``desc``, ``unit``... and uses it
        as a context manager with ``update(n)``. Its ``desc`` is the tail of the CDN URL, so ``label`` (the
        file name) is shown instead.
        """
        progress = self

        class _HubBar:
            def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **_: Any) -> None:
                self._task = progress.task(f"download {label}", total=total, completed=initial or 0)

            def update(self, n: int = 1) -> None:
                progress.advance(self._task, n)

            def close(self) -> None:
                return None

            def __enter__(self) -> _HubBar:
                return self

            def __exit__(self, *exc: object) -> None:
                return None

        return _HubBar
