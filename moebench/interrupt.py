"""SIGTERM and SIGHUP end a run the way Ctrl-C does: the case in progress is dropped,
finished cases are kept, the results are consolidated, and the resume command printed.

Inside `signals_interrupt()`, either signal raises `Interrupted` (a KeyboardInterrupt)
in the main thread, so one code path (`except KeyboardInterrupt`) handles all three.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

HANDLED = ("SIGTERM", "SIGHUP")


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; `signal_name` says which."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


def _raise(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise `Interrupted` while inside; the old handlers after.
    A signal the process ignores (nohup) stays ignored; outside the main thread (where
    handlers cannot be set) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for name in HANDLED:
        number = getattr(signal, name, None)
        # A signal ignored on purpose (nohup ignores SIGHUP) stays ignored.
        if number is not None and signal.getsignal(number) is not signal.SIG_IGN:
            previous[number] = signal.signal(number, _raise)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def interrupt_name(exc: KeyboardInterrupt) -> str:
    """'SIGTERM', 'SIGHUP', or 'Ctrl-C' (SIGINT)."""
    return exc.signal_name if isinstance(exc, Interrupted) else "Ctrl-C"
