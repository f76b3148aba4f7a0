"""What a user sees while a long command runs: short lines and rich progress bars, on stderr.

The log lines themselves go to the data directory's log file (``core/logsetup.py``); the terminal
gets a line per step and a bar for each long stage (a drive, the pipeline's stages, federated
rounds, rollout windows). Off a terminal (CI, a pipe) the bars are left out and only the lines are
printed, so captured output stays readable. :class:`Quiet` is the same interface doing nothing (tests,
``--json``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["StageProgress", "Quiet", "Advance"]

Advance = Callable[..., None]  # advance(n=1, note=None): n more steps done; note: a short status text


class Quiet:
    """No lines, no bars."""

    def say(self, message: str) -> None:
        pass

    @contextmanager
    def stage(self, description: str, total: int | None = None) -> Iterator[Advance]:
        yield lambda n=1, note=None: None


class StageProgress:
    """Lines and bars on ``stream`` (default stderr); bars only when it is a terminal (or ``bars``)."""

    def __init__(self, stream: Any = None, bars: bool | None = None) -> None:
        from rich.console import Console

        self.console = Console(file=stream or sys.stderr, highlight=False)
        self.bars = self.console.is_terminal if bars is None else bars
        self._progress: Any = None

    def say(self, message: str) -> None:
        """One short line (above the bar when one is showing)."""
        self.console.print(message, markup=False)

    @contextmanager
    def stage(self, description: str, total: int | None = None) -> Iterator[Advance]:
        """A bar for one long stage: ``total`` steps (None: a spinner with elapsed time)."""
        if not self.bars:
            yield lambda n=1, note=None: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}")]
        if total is not None:
            columns += [BarColumn(), MofNCompleteColumn()]
        columns += [TimeElapsedColumn(), TextColumn("{task.fields[note]}")]
        with Progress(*columns, console=self.console, transient=True) as progress:
            task = progress.add_task(description, total=total, note="")

            def advance(n: int = 1, note: str | None = None) -> None:
                progress.update(task, advance=n, **({"note": note} if note is not None else {}))

            yield advance
