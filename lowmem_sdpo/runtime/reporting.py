"""What the user sees while a run goes: progress bars with an ETA, one-line notes, a table per step.

On a terminal every long phase (loading and quantising, reference pass, training, merge, export, eval) is a
rich progress bar with elapsed time and ETA; a phase started while another's bar is up joins that display as
a second line (rich allows one live display at a time). Where stdout is not a terminal (a log file, CI) or
under `--quiet`, a phase is one line when it ends: what, how many, how long. `--quiet` silences the notes
and tables; errors still reach stderr through the CLI.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any


class Reporter:
    def __init__(self, quiet: bool = False, *, console: Any = None) -> None:
        """`console`: a rich Console to write to (tests pass one that is a terminal); default stdout."""
        from rich.console import Console

        self.quiet = quiet
        self.console = console or Console(stderr=False, highlight=False, quiet=quiet)
        # The one-line-per-phase log: printed under --quiet too.
        self._phase_console = console or Console(stderr=False, highlight=False)
        self._said: set[str] = set()
        self._progress: Any = None  # the live rich Progress while a bar is up

    @property
    def live(self) -> bool:
        """Bars on a terminal; one line per phase elsewhere and under --quiet."""
        return not self.quiet and self.console.is_terminal

    def note(self, message: str) -> None:
        if self.quiet:
            return
        self.console.print(message, markup=False)  # file names and "[ok]" are text, not rich markup

    def note_once(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            self.note(message)

    def _phase_line(self, description: str, done: int | None, total: int | None, seconds: float) -> None:
        count = f" {done}/{total}" if total else ""
        self._phase_console.print(f"{description}:{count} done in {seconds:.1f} s", markup=False)

    def _columns(self) -> list[Any]:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        return [
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),  # room for the fields after it on an 80-column terminal
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        ]

    @contextlib.contextmanager
    def _bar(self, description: str, total: int | None) -> Iterator[Callable[..., None]]:
        """A task on the live display (opened here when none is up); total None: a spinner, no ETA."""
        from rich.progress import Progress

        owner = self._progress is None
        if owner:
            self._progress = Progress(*self._columns(), console=self.console, transient=False)
            self._progress.start()
        progress = self._progress
        task_id = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields: Any) -> None:
            info = "  ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
            progress.update(task_id, advance=n, info=info)

        try:
            yield advance
            if total is None:
                progress.update(task_id, total=1, completed=1)
        finally:
            if owner:
                progress.stop()
                self._progress = None
            else:
                progress.remove_task(task_id)  # a nested phase's line goes when it ends

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[..., None]]:
        """Yields advance(n=1, **fields): fields are shown after the bar (loss, acc, tok/s, ...)."""
        with self._track(description, total) as advance:
            yield advance

    @contextlib.contextmanager
    def _track(self, description: str, total: int | None) -> Iterator[Callable[..., None]]:
        # phase() and merge_progress() come here directly, so that a subclass timing task() (the benchmarks'
        # phase clock) sees the same calls it saw before they existed.
        if self.live:
            with self._bar(description, total) as advance:
                yield advance
            return
        done = 0
        started = time.perf_counter()

        def count(n: int = 1, **_fields: Any) -> None:
            nonlocal done
            done += n

        yield count
        self._phase_line(description, done, total, time.perf_counter() - started)

    @contextlib.contextmanager
    def phase(self, description: str) -> Iterator[None]:
        """A phase with no count (loading and quantising a model): a spinner with elapsed time, or one line."""
        with self._track(description, None):
            yield

    def merge_progress(self) -> Callable[[str, int, int], None]:
        """A callback for the models package's (description, done, total) progress protocol: one bar per
        description, opened on its first call and closed when done == total (or one line then)."""
        open_bars: dict[str, tuple[Any, Callable[..., None], int]] = {}

        def report(description: str, done: int, total: int) -> None:
            if description not in open_bars:
                context = self._track(description, total)
                open_bars[description] = (context, context.__enter__(), 0)
            context, advance, seen = open_bars[description]
            advance(done - seen)
            open_bars[description] = (context, advance, done)
            if done >= total:
                del open_bars[description]
                context.__exit__(None, None, None)

        return report

    def table(self, title: str, rows: list[tuple[str, str]]) -> None:
        if self.quiet:
            return
        from rich.table import Table

        table = Table(title=title, show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value", justify="right")
        for key, value in rows:
            table.add_row(key, value)
        self.console.print(table)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
