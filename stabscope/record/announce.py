"""Where the line of a finding made while the run trains goes.

None (the default) is ``warnings.warn``, a library's way, which the user's warning filters
govern. ``stabscope profile`` prints the line itself while the script trains
(``announced_by``): a script's ``warnings.filterwarnings("ignore")`` or
``PYTHONWARNINGS=ignore`` is aimed at the script's own noise, and must not silence what
``--on-error warn`` promises to say. No torch here: the CLI's read side imports it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

_printer: Callable[[str], None] | None = None


def printer() -> Callable[[str], None] | None:
    """The printer in force, or None for ``warnings.warn``."""
    return _printer


@contextlib.contextmanager
def announced_by(line: Callable[[str], None]) -> Iterator[None]:
    """Live findings' lines go to ``line`` inside the block, not to ``warnings``."""
    global _printer
    before, _printer = _printer, line
    try:
        yield
    finally:
        _printer = before


__all__ = ["announced_by", "printer"]
