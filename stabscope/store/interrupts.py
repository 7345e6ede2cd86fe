"""SIGTERM and SIGINT close a run instead of losing it.

While a run is open its writer installs two handlers, on the main thread only, and only
where the handler in place is Python's default (a handler of the user's or of a framework is
left alone, and then decides what a signal does):

- SIGINT raises ``KeyboardInterrupt``, exactly as Python's default handler does;
- SIGTERM raises ``Terminated``, a ``SystemExit`` whose code is 128 + 15. The training
  loop's ``finally`` blocks and the Recorder's ``with`` run, the run is closed as
  ``interrupted`` with its buffered rows written, and an uncaught ``Terminated`` ends the
  process with status 143, what a shell reports for a process ended by SIGTERM. Without the
  handler SIGTERM would end the process at once and lose the buffered rows.

A signal that arrives inside a ``deferred()`` section (a step's bookkeeping, a part or
meta.json being written, the run being closed) is held until the outermost section ends, so
a part is never half written or half counted. The previous handlers come back when the last
open run closes. No torch import here.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(SystemExit):
    """Raised on the main thread by SIGTERM while a run is open; exit code 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"received {signal_name(self.signum)}"


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def interrupting_signal(error: BaseException | None) -> int | None:
    """The signal an exception stands for: SIGINT for ``KeyboardInterrupt``, the signal of a
    ``Terminated``; None for anything else."""
    if isinstance(error, Terminated):
        return error.signum
    if isinstance(error, KeyboardInterrupt):
        return int(signal.SIGINT)
    return None


def ending_status(error: BaseException | None) -> str:
    """The status a run ends with when ``error`` ends it: ``complete`` without one,
    ``interrupted`` for SIGINT/SIGTERM, ``failed`` otherwise."""
    if error is None:
        return "complete"
    return "interrupted" if interrupting_signal(error) is not None else "failed"


class _State(threading.local):
    depth = 0  # nesting of deferred() sections on this thread


_local = _State()
_lock = threading.Lock()
_users = 0
_previous: dict[int, Any] = {}
_pending: int | None = None  # a signal held until the main thread leaves deferred()
_received: int | None = None  # the last signal the handler saw


def _is_default(signum: int, handler: Any) -> bool:
    default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
    return handler is default


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _handler(signum: int, frame: Any) -> None:
    global _pending, _received
    _received = signum
    if _local.depth:  # runs on the main thread: this is the main thread's depth
        _pending = signum
        return
    _raise_for(signum)


def received() -> int | None:
    """The last SIGINT or SIGTERM seen while a run was open, if any."""
    return _received


def install() -> bool:
    """Take the handlers for one more open run; False (nothing done) off the main thread."""
    global _users
    if threading.current_thread() is not threading.main_thread():
        return False
    with _lock:
        if _users == 0:
            for signum in SIGNALS:
                current = signal.getsignal(signum)
                if _is_default(signum, current):
                    _previous[signum] = current
                    signal.signal(signum, _handler)
        _users += 1
    return True


def uninstall() -> None:
    """Give back what ``install`` took; the last open run restores the previous handlers."""
    global _users
    with _lock:
        _users = max(_users - 1, 0)
        if _users or threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in _previous.items():
            if signal.getsignal(signum) is _handler:
                signal.signal(signum, previous)
        _previous.clear()


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """``install`` for the duration of a block (a whole CLI command)."""
    installed = install()
    try:
        yield
    finally:
        if installed:
            uninstall()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then raise what arrived meanwhile."""
    global _pending
    _local.depth += 1
    try:
        yield
    finally:
        _local.depth -= 1
        main = threading.current_thread() is threading.main_thread()
        if _local.depth == 0 and _pending is not None and main:
            signum, _pending = _pending, None
            _raise_for(signum)


__all__ = [
    "Terminated",
    "deferred",
    "ending_status",
    "handling",
    "install",
    "interrupting_signal",
    "received",
    "signal_name",
    "uninstall",
]
