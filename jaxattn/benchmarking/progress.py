"""Progress of a `jaxattn compare` or `jaxattn bench` run.

On a terminal: one rich.progress display for the whole run (what runs now, a bar, done of
total, elapsed time and the time left), with a line printed above it for every finished
measurement. Without a terminal (`make compare > log 2>&1`, CI): no display, one plain line
per finished measurement, flushed at once, so a log shows the run as it goes.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)


class RunProgress:
    """Use as a context manager around the run; call :meth:`start` when a measurement
    begins and :meth:`finished` with its one-line summary when it ends."""

    def __init__(self, total: int, title: str, *, console: Console | None = None):
        self.total = total
        self.title = title
        self.done = 0
        self.console = console if console is not None else Console()
        self.live = self.console.is_terminal
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> "RunProgress":
        if self.live:
            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                console=self.console)
            self._progress.start()
            self._task = self._progress.add_task(self.title, total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def start(self, label: str) -> None:
        """Say what runs now (shown on the display; nothing is printed without a terminal)."""
        if self._progress is not None:
            self._progress.update(self._task, description=f"{self.title}: {label}")

    def finished(self, line: str) -> None:
        """One measurement is done: count it and print its summary line."""
        self.done += 1
        text = f"[{self.done}/{self.total}] {line}"
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
            self._progress.update(self._task, advance=1)
        else:
            out = self.console.file
            out.write(text + "\n")
            out.flush()
