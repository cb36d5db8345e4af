"""What the user sees while a run goes: rich progress bars, one-line notes, a table per step; `--quiet`
silences all of it (errors still reach stderr through the CLI)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


class Reporter:
    def __init__(self, quiet: bool = False) -> None:
        from rich.console import Console

        self.quiet = quiet
        self.console = Console(stderr=False, highlight=False, quiet=quiet)
        self._said: set[str] = set()

    def note(self, message: str) -> None:
        self.console.print(message, markup=False)  # file names and "[ok]" are text, not rich markup

    def note_once(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            self.note(message)

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        """Yields advance(n=1, **fields): fields are shown after the bar (loss, acc, tok/s, ...)."""
        if self.quiet:
            yield lambda n=1, **fields: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
        )
        with progress:
            task_id = progress.add_task(description, total=total, info="")

            def advance(n: int = 1, **fields: Any) -> None:
                info = "  ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
                progress.update(task_id, advance=n, info=info)

            yield advance

    def merge_progress(self) -> Callable[[str, int, int], None] | None:
        """A callback for the models package's (description, done, total) progress protocol: one bar per
        description, opened on its first call and closed when done == total."""
        if self.quiet:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        open_bars: dict[str, tuple[Any, Any]] = {}

        def report(description: str, done: int, total: int) -> None:
            if description not in open_bars:
                bar = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    console=self.console,
                )
                bar.start()
                open_bars[description] = (bar, bar.add_task(description, total=total))
            bar, task_id = open_bars[description]
            bar.update(task_id, completed=done)
            if done >= total:
                bar.stop()
                del open_bars[description]

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
