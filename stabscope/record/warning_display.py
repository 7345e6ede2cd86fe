"""The script's warnings shown once per location while a run records, as without stabscope.

Python shows a warning under its default action once per (text, category, module, line):
each module's ``__warningregistry__`` remembers what it showed. Every ``catch_warnings()``
exit invalidates all of those registries at once (it marks the filters as changed), and
while a run records, ``catch_warnings`` runs often outside the script: pandas and numpy
call it inside the online rules' worker, stabscope's own readers too. A script whose step
warned once showed that warning again after each of them: 63 times in 400 steps of a
tabular regression whose loss broadcast its targets.

So the display is wrapped, once per process, with a memory of what it showed that no
filter change resets: a warning whose effective action is ``default`` (the usual one) is
shown once per (text, category, file, line), ``module`` once per (text, category, module)
and ``once`` once per (text, category); ``always`` is shown every time, as asked. The
effective action is read from ``warnings.filters`` as ``warn_explicit`` matches them.
"""

from __future__ import annotations

import warnings
from typing import Any

#: At most this many distinct warnings are remembered; past it the memory starts over (a
#: script that warns with a new text each step must not grow the process without bound).
MAX_REMEMBERED = 4096

_shown: set[tuple[Any, ...]] = set()
_previous: Any = None


def install() -> None:
    """Wrap ``warnings.showwarning`` with the memory (module docstring); once per process."""
    global _previous
    if _previous is not None:
        return
    _previous = warnings.showwarning
    warnings.showwarning = _show_once


def _show_once(
    message: Any, category: type[Warning], filename: str, lineno: int, *args: Any, **kw: Any
) -> None:
    key = shown_key(str(message), category, filename, lineno)
    if key is not None:
        if key in _shown:
            return
        if len(_shown) >= MAX_REMEMBERED:
            _shown.clear()
        _shown.add(key)
    _previous(message, category, filename, lineno, *args, **kw)


def shown_key(
    text: str, category: type[Warning], filename: str, lineno: int
) -> tuple[Any, ...] | None:
    """What makes a warning new under its effective action; None for ``always``."""
    # warn_explicit's module when it was not given one: the file name without ".py".
    module = filename[:-3] if filename[-3:].lower() == ".py" else filename
    action = effective_action(text, category, module, lineno)
    if action == "always":
        return None
    if action == "once":
        return (text, category)
    if action == "module":
        return (text, category, module)
    return (text, category, filename, lineno)


def effective_action(text: str, category: type[Warning], module: str, lineno: int) -> str:
    """The action of the first filter that matches, as ``warnings.warn_explicit`` finds it."""
    for action, pattern, kind, where, line in warnings.filters:
        if (
            (pattern is None or pattern.match(text))
            and issubclass(category, kind)
            and (where is None or where.match(module))
            and (line == 0 or lineno == line)
        ):
            return str(action)
    return str(warnings.defaultaction)


__all__ = ["MAX_REMEMBERED", "effective_action", "install", "shown_key"]
