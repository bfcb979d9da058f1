"""Visible progress for slow steps (export, calibration, engine builds), silent with --quiet."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

T = TypeVar("T")
COLUMNS = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
           TimeElapsedColumn())


class Steps:
    """Named steps with a spinner and elapsed time, and progress bars over iterables."""

    def __init__(self, quiet: bool = False, console: Console | None = None):
        self.quiet = quiet
        self.console = console or Console(stderr=True)
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        start = time.perf_counter()
        if self.quiet:
            yield
        else:
            with self.console.status(description):
                yield
        self.timings[description] = elapsed = time.perf_counter() - start
        if not self.quiet:
            self.console.print(f"[green]✓[/] {description} [dim]({elapsed:.1f} s)[/]")

    def track(self, items: Iterable[T], description: str, total: int | None = None
              ) -> Iterator[T]:
        if self.quiet:
            yield from items
            return
        with Progress(*COLUMNS, console=self.console, transient=True) as progress:
            yield from progress.track(items, total=total, description=description)

    @contextlib.contextmanager
    def counter(self, description: str, total: int) -> Iterator[Callable[[], None]]:
        """A progress bar for work that reports itself: call the yielded function per item."""
        if self.quiet:
            yield lambda: None
            return
        with Progress(*COLUMNS, console=self.console, transient=True) as progress:
            task = progress.add_task(description, total=total)
            yield lambda: progress.advance(task)

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)
