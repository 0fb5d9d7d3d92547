"""SIGTERM and SIGHUP end a run the way Ctrl-C does: the case in progress is dropped,
finished cases are kept, the results are consolidated, and the resume command printed.

Inside `signals_interrupt()`, either signal raises `Interrupted` (a KeyboardInterrupt)
in the main thread, so one code path (`except KeyboardInterrupt`) handles all three.

A terminal's Ctrl-C reaches the whole foreground process group: the run's worker and
rank processes too. They leave it to the run, which stops them (`ctrl_c_held` while
starting one, `ignore_ctrl_c` first thing in it), so an interrupt prints no traceback
of theirs, also while they are still importing torch.
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


@contextmanager
def ctrl_c_held() -> Iterator[None]:
    """Hold Ctrl-C back while child processes start inside. A child inherits it held,
    from its first instruction through its imports, until it calls `ignore_ctrl_c`. This
    process gets a Ctrl-C pressed meanwhile when the block ends, once the children are
    started and known (so that they can be stopped): none is lost."""
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX: nothing to hold
        yield
        return
    # multiprocessing's resource tracker, started with the first spawned process, lifts
    # any block of SIGINT when it starts: started now, it cannot lift ours.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    # The block holds this thread alone (the children inherit it); another thread of this
    # process may still take the signal, so its handler only notes it until the end. (If
    # that thread runs the handler only after the block, the press is raised then, by the
    # handler restored: later, not lost.)
    pressed: list[int] = []
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda n, _: pressed.append(n)) if in_main else None
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
        if in_main:
            signal.signal(signal.SIGINT, previous)
    if pressed and callable(previous):
        previous(signal.SIGINT, None)  # KeyboardInterrupt, as the press would have raised


def ignore_ctrl_c() -> None:
    """In a worker or rank process: ignore SIGINT (the run that started it stops it),
    then let go of the one `ctrl_c_held` held back, which is dropped unseen."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def interrupt_name(exc: KeyboardInterrupt) -> str:
    """'SIGTERM', 'SIGHUP', or 'Ctrl-C' (SIGINT)."""
    return exc.signal_name if isinstance(exc, Interrupted) else "Ctrl-C"
