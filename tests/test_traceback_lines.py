"""meta.json's ``error.traceback``: what Python's own ``traceback`` prints, cut to the last
frames, never a line twice."""

from __future__ import annotations

import traceback

from stabscope.errors import UsageError
from stabscope.record.run_meta import TRACEBACK_FRAMES, traceback_lines


def _deep(n: int) -> None:
    if n == 0:
        raise ValueError("bad batch")
    _deep(n - 1)


def test_an_error_never_raised_is_its_one_line():
    error = UsageError("no module holds the optimizer's parameters", hint="build one")
    assert traceback_lines(error) == traceback.format_exception_only(type(error), error)


def test_a_raised_error_keeps_the_header_the_last_frames_and_its_line():
    try:
        _deep(TRACEBACK_FRAMES + 5)
    except ValueError as err:
        full = traceback.format_exception(type(err), err, err.__traceback__)
        lines = traceback_lines(err)
    assert lines[0] == full[0] and lines[-1] == full[-1] == "ValueError: bad batch\n"
    assert lines[1:-1] == full[1:-1][-TRACEBACK_FRAMES:]


def test_a_wrapped_error_ends_with_the_wrapping_line_after_the_users_own():
    try:
        try:
            _deep(1)
        except ValueError as err:
            raise UsageError("the script raised") from err
    except UsageError as wrapped:
        lines = traceback_lines(wrapped)
    assert lines[-2] == "ValueError: bad batch\n"
    assert lines[-1].startswith("stabscope.errors.UsageError: the script raised")
    assert lines.count(lines[-1]) == 1
