"""The script's own warnings, shown as they would be without stabscope.

Two places run the script's torch calls from inside stabscope: the loss trace's
``TorchFunctionMode`` (record/loss_tail.py) passes each call of the first step through its
``__torch_function__``, and the stability index replays the traced calls. A warning such a
call raises (``mse_loss`` warns of a target it broadcasts, with ``stacklevel=2``) would then
name stabscope's frame as its source, and a replay would raise it again at every
measurement. So a passed-through call's warnings are raised again at the script's line that
made the call (the innermost frame outside stabscope and torch), with that module's registry
so the default "once per location" still holds, and a replay's are not shown: the script's
own call already showed them.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import torch

#: Frames in these directories (stabscope's package, torch's) are not the script's.
_INSIDE = tuple(
    os.path.dirname(os.path.abspath(path)) + os.sep
    for path in (os.path.dirname(__file__), torch.__file__ or "")
    if path
)


def call_as_script(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``func(*args, **kwargs)``; the warnings it raises are raised again at the script's line
    that made the call, under the script's filters (an ``error`` filter still raises)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = func(*args, **kwargs)
    if caught:
        frame = _script_frame()
        for w in caught:
            if frame is None:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                continue
            registry = frame.f_globals.setdefault("__warningregistry__", {})
            warnings.warn_explicit(
                w.message,
                w.category,
                frame.f_code.co_filename,
                frame.f_lineno,
                module=frame.f_globals.get("__name__"),
                registry=registry,
            )
    return out


@contextmanager
def quiet() -> Iterator[None]:
    """Drop the warnings of what runs inside: a replay of calls the script already made.
    The filters are left as they are: changing them (``catch_warnings``) resets every
    module's "once per location" registry, and the script's own next call showed its
    warning again after each replay. A filter that turns the warning into an error raises
    in the replay as it did in the script's own call."""
    shown = warnings.showwarning
    warnings.showwarning = _nothing
    try:
        yield
    finally:
        warnings.showwarning = shown


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def _script_frame() -> FrameType | None:
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INSIDE):
        frame = frame.f_back
    return frame
