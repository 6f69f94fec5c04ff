"""What a run shows on stderr: a bar over the optimizer steps on a terminal, a line every 10 steps in a log."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


class StepBar:
    """A rich bar over the optimizer steps with the last step's loss and learning rate, on a terminal's stderr.
    Lines said meanwhile go out with the bar lifted, so that neither is cut."""

    def __init__(self, console: Any, total: int, done: int, say: Callable[[str], None]) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}"), TimeRemainingColumn(),
                                 console=console, transient=True)
        self.task = self.progress.add_task("training", total=total, completed=done, loss="-", lr="-")
        self.lines = say

    def update(self, step: int, loss: float, lr: float) -> None:
        self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.3g}", refresh=True)

    def say(self, msg: str) -> None:
        self.progress.stop()
        self.lines(msg)
        self.progress.start()


@contextmanager
def step_bar(show: bool, total: int, done: int, say: Callable[[str], None]) -> Iterator[StepBar | None]:
    """The bar on a terminal; None elsewhere (a log gets a line every 10 steps instead)."""
    console = _stderr_console() if show else None
    if console is None or not console.is_terminal:
        yield None
        return
    bar = StepBar(console, total, done, say)
    with bar.progress:
        yield bar


@contextmanager
def no_library_bars() -> Iterator[None]:
    """transformers' own tqdm bars ("Writing model shards" in save_pretrained) stay off while mam writes:
    mam draws its own progress, and a log or ``-q`` gets none of theirs."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def quiet(_msg: str) -> None:
    """Progress sink without a progress callback, and for the other processes of a launched run."""
