"""What the master tells a person at a terminal: the shared rich console and the Reporter that prints a launch
(messages, border flags in yellow, a live progress bar, or a line per change when output is not a terminal)."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import pandas as pd
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from master.launcher import Reporter
from master.leaderboard import render_table

console = Console(highlight=False)


class ConsoleReporter(Reporter):
    """A launch told on the terminal: messages, border flags in yellow, a live progress bar, leaderboards."""

    def message(self, text: str) -> None:
        console.print(text)

    def warning(self, text: str) -> None:
        console.print(f"[yellow]{text}[/]")

    def line(self, text: str, kind: str) -> None:
        """Border flags in yellow, the watch loop's actions dimmed above the progress, the plan plain."""
        console.print(f"[yellow]{text}[/]" if kind == "flag" else text if kind == "plan" else f"[dim]{text}[/]")

    def leaderboard(self, df: pd.DataFrame, title: str) -> None:
        console.print(render_table(df, top=10, title=title, width=console.width))

    @contextlib.contextmanager
    def following(self, label: str, total: int) -> Iterator[Callable[[int, int, str], None]]:
        if not console.is_terminal:  # a log, not a screen: a line per change instead of a live bar
            with super().following(label, total) as update:
                yield update
            return
        progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("{task.fields[detail]}"), console=console)
        task = progress.add_task(label, total=total, detail="")
        best = Text("best so far: -")

        def update(finished: int, running: int, best_line: str) -> None:
            progress.update(task, completed=finished, detail=f"{running} running")
            best.plain = best_line

        with Live(Group(progress, best), console=console, refresh_per_second=4):
            yield update
