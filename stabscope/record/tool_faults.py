"""stabscope's own errors never end the training they watch.

stabscope's code runs inside the user's training step: its forward and gradient hooks, its
optimizer step hooks (and what they run inside a closure), the step boundary
(``Recorder.step``: rows and probes), the listener inside a ``clip_grad_norm_``, and in
zero-code mode the global hooks that find the model and the loss read inside the script's
``loss.backward()`` before its pass. An exception raised there is
stabscope's, not the training's: unguarded, it surfaced in the user's own ``model(x)``,
``loss.backward()`` or ``opt.step()`` and ended the training (zero-code mode then reported
it as the script's error, "fix the script"). Every such entry point runs under ``guarded``
(or ``catching``, inline):
the first exception is kept (``FAULTS.error``, written to meta.json as ``tool_error``:
where, the step, the type, the message and the traceback), one line on stderr says so, and
from then on every guarded entry point does nothing: the recording stops at that step, what
was recorded before stays, and the training goes on as it would without stabscope. The
``run-status`` rule reads such a run as incomplete, so a gate does not pass a run on steps it
never saw.

Exceptions that stabscope raises on purpose pass through: a ``UsageError`` (an ``--include``
that matches no module), a ``RunWriteError`` (the disk), and ``StopScript`` /
``StopOnFinding`` (``BaseException`` s, as are Ctrl-C and ``sys.exit``). Under
``torch.compile`` a guarded hook is traced as it is (``compiling()``), and the compiler's own
exceptions (a trace that failed inside a hook: Dynamo then runs the frame eagerly) pass
through too.

The user's own code that stabscope calls is not guarded: an ``on_finding`` callback may
raise to stop the training, as it could before.

One state per process: a process records one run at a time (the zero-code runner, a
callback, a ``Recorder``); a new run starts with no fault. Known limit: a run started while
another is still open clears the other's fault. Under torchrun a rank other than 0 writes
its fault beside meta.json at close (``fault-rankR.json``, store/rank_errors.py).
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import RunWriteError, UsageError
from ..wording import first_line
from .hook_context import compiling

F = TypeVar("F", bound=Callable[..., Any])

#: How much of the traceback meta.json keeps (its last frames, where stabscope raised).
TRACEBACK_CHARS = 4000


class ToolFaults:
    """The process's first fault of stabscope's own, and the step the run was at."""

    def __init__(self) -> None:
        self.error: dict[str, Any] | None = None
        self.step = 0  # the step being run (the Recorder sets it at each boundary)
        #: Called once, at the fault (zero-code mode: close at the next safe point).
        self.on_fault: Callable[[], None] | None = None

    def reset(self) -> None:
        """A new run: no fault, step 0 (``on_fault`` stays: its owner sets and clears it)."""
        self.error, self.step = None, 0

    def record(self, where: str, exc: BaseException) -> None:
        if self.error is not None:
            return
        # Its first line: torch's "Could not run 'aten::...' with arguments from the
        # 'SparseCPU' backend" goes on for 28 KB of dispatch keys, which would fill the
        # console and push the frames that say where stabscope raised out of the traceback.
        message = first_line(str(exc))
        # The frames, then the exception's first line: the frames say where it raised.
        frames = "".join(traceback.format_tb(exc.__traceback__))
        text = f"{frames}{type(exc).__name__}: {message}\n"
        self.error = {
            "where": where,
            "step": self.step,
            "type": type(exc).__name__,
            "message": message,
            "traceback": text[-TRACEBACK_CHARS:],
        }
        print(f"stabscope: warning: {fault_note(self.error)}", file=sys.stderr, flush=True)
        if self.on_fault is not None:
            self.on_fault()


FAULTS = ToolFaults()


def fault_note(entry: dict[str, Any]) -> str:
    """The run's note, and the console's warning, on a fault."""
    return (
        f"stabscope's own error in {entry['where']} at step {entry['step']} "
        f"({entry['type']}: {entry['message']}) stopped the recording there; the training "
        "went on without it and nothing after that step is recorded (meta.json's "
        "tool_error keeps the traceback: please report it)"
    )


class catching:
    """The guard as a ``with`` block, for code that runs inline in a public call
    (``Recorder.step``): the block runs in the caller's own frame, so warnings raised in it
    keep the ``stacklevel`` that points at the user's line. Check ``FAULTS.error`` first
    where the block must not run once a fault is kept."""

    def __init__(self, where: str) -> None:
        self.where = where

    def __enter__(self) -> catching:
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or compiling() or not kept(exc):
            return False
        FAULTS.record(self.where, exc)
        return True  # suppressed: the training goes on


#: Where the compiler's own exceptions come from: a trace that failed inside a hook
#: belongs to Dynamo, which falls back to running the frame eagerly.
COMPILER_MODULES = ("torch._dynamo", "torch._inductor", "torch.fx", "torch._subclasses")


def kept(exc: BaseException) -> bool:
    """Whether the guard keeps ``exc`` as stabscope's own fault: an ``Exception`` that is no
    deliberate refusal of stabscope's and no compiler's."""
    if not isinstance(exc, Exception) or isinstance(exc, (UsageError, RunWriteError)):
        return False
    return not type(exc).__module__.startswith(COMPILER_MODULES)


def guarded(where: str) -> Callable[[F], F]:
    """Run the decorated entry point under the guard (module docstring): once a fault is
    kept it does nothing and returns None (a hook's "no change")."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if compiling():  # traced into the graph as it is
                return fn(*args, **kwargs)
            if FAULTS.error is not None:
                return None
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # stabscope's own: BaseExceptions (stops, Ctrl-C) pass
                if not kept(exc):
                    raise
                FAULTS.record(where, exc)
                return None

        return call  # type: ignore[return-value]

    return decorate
