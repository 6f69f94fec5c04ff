"""Stop requests: a signal while training is acted on where the saved state is whole."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import torch

from mamcli.errors import Interrupted

SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")  # deferred to the end of the optimizer step while training


class StopRequests:
    """Ctrl-C, SIGTERM and SIGHUP while training are noted and acted on at the end of the optimizer step,
    where the saved state is whole; then the signal is handed on as it came (to the handler before this
    one: ``mam``'s raises :class:`Interrupted`, exit 128 + N; Python's default raises KeyboardInterrupt).
    A second signal is handed on at once; the last checkpoint stays."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is threading.main_thread():
            for num in (getattr(signal, n) for n in SIGNALS if hasattr(signal, n)):
                if signal.getsignal(num) not in (signal.SIG_IGN, None):
                    self.previous[num] = signal.signal(num, self._note)
        try:
            yield
        finally:
            self._restore()

    def _restore(self) -> None:
        for num, handler in self.previous.items():
            signal.signal(num, handler)
        self.previous = {}

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            self.hand_on(signum, frame)
        self.signum = signum
        self.say(f"{signal.Signals(signum).name}: saving the run at the end of this step (again to stop at once)")

    def requested(self, acc: Any) -> bool:
        """Whether any process was signalled (all processes must stop at the same step)."""
        if acc.num_processes == 1:
            return self.signum is not None
        flag = torch.tensor(float(self.signum is not None), device=acc.device)
        return bool(acc.reduce(flag, "sum") > 0)

    def hand_on(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        """Deliver the signal to the handler it would have reached; raise :class:`Interrupted` if that one did not."""
        num = signum or self.signum or signal.SIGTERM  # another process was signalled: stop like it
        handler = self.previous.get(num)
        self._restore()
        if callable(handler):
            handler(num, frame)
        raise Interrupted(num)
