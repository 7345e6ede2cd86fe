"""One rule's exception is that rule's failure, never the gate's crash.

A rule is arithmetic over a table a diverged run fills with NaN and Inf; a bug there must
not cost the user every other rule's verdict (or the JSON a CI job parses). ``isolated``
runs one step of a rule and turns an exception into a :class:`RuleFailure` that the outputs
report next to (not among) the plain skips. A rule that yielded findings before raising loses
them: a half-finished verdict is not one.
"""

from __future__ import annotations

import contextlib
import sysconfig
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

T = TypeVar("T")


@dataclass(frozen=True)
class RuleFailure:
    """Why a rule did not finish: the exception's type and message, and the innermost line
    of stabscope's code it came from (``rules/depth.py:127``), to quote in a bug report."""

    type: str
    message: str
    where: str = ""

    def __str__(self) -> str:
        text = f"{self.type}: {self.message}" if self.message else self.type
        return f"{text} ({self.where})" if self.where else text


PACKAGE = Path(__file__).resolve().parents[1]
LIBRARIES = [Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "purelib", "platlib")]


def _ours(filename: str) -> bool:
    """stabscope's code or a rule defined elsewhere; not pandas', numpy's or Python's."""
    path = Path(filename).resolve()
    return path.is_relative_to(PACKAGE) or not any(path.is_relative_to(p) for p in LIBRARIES)


def _where(error: BaseException) -> str:
    """The innermost frame of the rule's own code, not the library it called, as
    ``folder/file.py:line``."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if _ours(f.filename)]
    if not frames:
        return ""
    path = Path(frames[-1].filename)
    return f"{path.parent.name}/{path.name}:{frames[-1].lineno}"


def isolated(work: Callable[[], T]) -> tuple[T | None, RuleFailure | None]:
    """``(work(), None)``, or ``(None, failure)`` when it raises.

    NaN and Inf are expected data here: numpy's warnings about them (an all-NaN slice, a
    division by zero) would only be noise on the terminal, so they are silenced. ``work``
    should return a list, not a generator, so that the rule runs inside.
    """
    try:
        with _quiet(), np.errstate(all="ignore"):
            return work(), None
    except Exception as e:  # any bug in one rule is reported, not raised
        return None, RuleFailure(type(e).__name__, str(e), _where(e))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """numpy's RuntimeWarnings off, on the main thread. ``catch_warnings`` changes the filters
    of the whole process: on another thread (the online rules' worker, ``rules.online``) it
    would silence the training thread's warnings too, and its exit could undo a filter that
    thread set meanwhile; that worker drops its warnings itself."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
