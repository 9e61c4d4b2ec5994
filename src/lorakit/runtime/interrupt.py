"""Ctrl-C while training: stop at the next step boundary, where everything a resume reads agrees.

A KeyboardInterrupt can land anywhere inside an optimizer step: after `optimizer.step()` but before the step
counter moves, or after it moves but before the step's line reaches metrics.jsonl (an eval can hold that
window open for seconds). A checkpoint taken there disagrees with the metrics, and a resume from it repeats
an update or leaves a step out of the curve. So while the loop runs, the first SIGINT only asks to stop: the
step in flight finishes (its metrics line and eval included) and the loop stops between two steps, where
the weights, optimizer, counters, data position and metrics.jsonl all say the same step. A second SIGINT
stops at once (KeyboardInterrupt) for a step that would take too long, and nothing new is saved.

The request is a flag, nothing more: a Python signal handler runs between two bytecodes of the main thread,
which may be in the middle of a write to stderr (a progress bar), so the handler prints nothing.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


class StopRequest:
    """`with StopRequest() as stop:` ... `if stop.requested:` stop cleanly; `stop.forced`: a second SIGINT
    raised KeyboardInterrupt mid-step. Off (`enabled=False`), outside the main thread, or where SIGINT is
    ignored (a background job of a non-interactive shell), it changes nothing."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.requested = False
        self.forced = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> StopRequest:
        if self.enabled and threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous is not signal.SIG_IGN:
                self._previous = previous if previous is not None else signal.default_int_handler
                signal.signal(signal.SIGINT, self._handle)
                self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            self.forced = True
            raise KeyboardInterrupt
        self.requested = True
