"""stabscope's own errors never end the training script it records.

In zero-code mode stabscope's code runs inside the user's training: at every root module call
(finding the model), at every optimizer step (ending a step: rows, probes, the online rules).
An exception raised there is stabscope's, not the script's: before this guard it surfaced in
the script's own ``model(x)`` or ``opt.step()`` and ended the training, reported as the
script's error ("fix the script"). Under the guard it is kept (meta.json ``tool_error``:
where, the step, the type, the message and the traceback), warned about once, and the
recording stops there: nothing after it is recorded, what was recorded before stays, and the
script trains on as it would without stabscope. The ``run-status`` rule then reads the run as
incomplete, so a gate does not pass a run on steps it never saw.

Exceptions that stabscope raises on purpose pass through: a ``UsageError`` (an ``--include``
that matches no module), a ``RunWriteError`` (the disk), and ``StopScript`` /
``StopOnFinding``, which are ``BaseException`` s.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from ...errors import RunWriteError, UsageError

F = TypeVar("F", bound=Callable[..., Any])

#: How much of the traceback meta.json keeps (its last frames, where stabscope raised).
TRACEBACK_CHARS = 4000


def fault_entry(where: str, step: int, exc: BaseException) -> dict[str, Any]:
    """meta.json's ``tool_error``: where stabscope raised, at which step, and what."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {
        "where": where,
        "step": step,
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": text[-TRACEBACK_CHARS:],
    }


def fault_note(entry: dict[str, Any]) -> str:
    """The run's note, and the console's warning, on a fault."""
    return (
        f"stabscope's own error in {entry['where']} at step {entry['step']} "
        f"({entry['type']}: {entry['message']}) stopped the recording there; the training "
        "went on without it and nothing after that step is recorded (meta.json's "
        "tool_error keeps the traceback: please report it)"
    )


def guarded(method: F) -> F:
    """A hook method of an object with ``tool_error`` (None until a fault) and
    ``on_tool_fault(where, exc)``: once a fault is kept it does nothing more."""

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.tool_error is not None:
            return None
        try:
            return method(self, *args, **kwargs)
        except (UsageError, RunWriteError):
            raise
        except Exception as exc:  # stabscope's own: BaseExceptions (stops, Ctrl-C) pass
            self.on_tool_fault(method.__name__.lstrip("_"), exc)
            return None

    return call  # type: ignore[return-value]


def warn_fault(entry: dict[str, Any]) -> None:
    """One line on stderr, where the script's own output goes on."""
    print(f"stabscope: warning: {fault_note(entry)}", file=sys.stderr, flush=True)
