"""One progress display for the whole program: rich bars on stderr, nested bars as rows of it.

``display()`` is the one live display (rich allows one at a time): the first caller opens it and
later callers (the diffusion core's training and sampling loops inside ``generate``) add rows to it.
``Bar`` is a row with the small tqdm-like interface those loops use (``update``, ``set_postfix``,
``close``). A bar with a time budget shows the steps that budget will allow, not ``total``: its
end and its time left follow the budget (``pretrain --time-budget``, ``fit --time-budget``).
Where stderr is not a terminal (a log file, ``nohup``, a batch job), rich draws the bars only when
they end, so a row also writes a plain line every ``LOG_EVERY_S`` seconds: steps, elapsed, time left.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_active: list[Progress] = []
LOG_EVERY_S = 60.0


def new_progress(console: Console | None = None, transient: bool = False) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[postfix]}"),
                    console=console or Console(stderr=True), transient=transient)


@contextmanager
def display(console: Console | None = None) -> Iterator[Progress]:
    """The live display: a new one, or the one already open (then this adds rows to it)."""
    if _active:
        yield _active[-1]
        return
    progress = new_progress(console)
    with progress:
        _active.append(progress)
        try:
            yield progress
        finally:
            _active.pop()


class Bar:
    """A row of the display: ``total`` steps (``initial`` already done); ``time_budget_s`` makes the
    row's total the steps the budget allows at the speed so far; ``leave=False`` removes it when
    closed; ``disable`` shows nothing (e.g. every process of a launch but the first)."""

    def __init__(self, total: int, description: str, *, initial: int = 0, disable: bool = False,
                 time_budget_s: float | None = None, leave: bool = True):
        self.total, self.initial, self.done, self.budget, self.leave = total, initial, 0, time_budget_s, leave
        self.description, self.postfix = description, ""
        self.started = self._logged = time.monotonic()
        self._own = None
        self._progress = None
        if disable:
            return
        if _active:
            self._progress = _active[-1]
        else:
            self._own = self._progress = new_progress()
            self._own.start()
            _active.append(self._own)
        self._task = self._progress.add_task(description, total=self._shown_total(), completed=initial, postfix="")

    def _shown_total(self) -> int:
        if self.budget is None or not self.done:
            return self.total
        elapsed = max(time.monotonic() - self.started, 1e-9)
        allowed = self.done / elapsed * max(self.budget - elapsed, 0.0)
        return min(self.total, self.initial + self.done + math.ceil(allowed))

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._progress is not None:
            self._progress.update(self._task, advance=n, total=self._shown_total())
            if not self._progress.console.is_terminal and time.monotonic() - self._logged >= LOG_EVERY_S:
                self._log()

    def _log(self) -> None:
        """A plain line for a log: ``description: done/total, elapsed, time left, postfix``."""
        self._logged = now = time.monotonic()
        elapsed, total = now - self.started, self._shown_total()
        left = (total - self.initial - self.done) * elapsed / self.done
        self._progress.console.print(f"{self.description}: {self.initial + self.done}/{total}, {_clock(elapsed)} elapsed, "
                                     f"~{_clock(left)} left {self.postfix}".rstrip(), highlight=False, markup=False)

    def set_postfix(self, **values: object) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())
        if self._progress is not None:
            self._progress.update(self._task, postfix=self.postfix)

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Ends the row (and the display it opened): also when the work raised, or a later bar
        would join a display that no longer draws (a notebook after a failed fit)."""
        if self._progress is None:
            return
        if self.budget is not None:  # stopped: the steps done are the whole of this run
            self._progress.update(self._task, total=self.initial + self.done)
        if not self.leave:
            self._progress.remove_task(self._task)
        if self._own is not None:
            self._own.stop()
            _active.remove(self._own)
        self._progress = None


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def bar_iter(iterable, total: int, description: str, *, leave: bool = False):
    """``iterable`` with a ``Bar`` advancing per item (tqdm(iterable) of the sampling loops)."""
    progress = Bar(total, description, leave=leave)
    try:
        for item in iterable:
            yield item
            progress.update(1)
    finally:
        progress.close()
