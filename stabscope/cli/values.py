"""Command-line values checked before any work starts: numbers in their range, option values
that are not empty, and output files that can be written.

Each check raises ``UsageError`` (one line, a hint, exit 2). Typer's own ``min=``/``max=``
would print a framed multi-line panel instead, so the ranges are checked here.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from ..errors import UsageError


class Severity(str, Enum):
    """``--fail-on``: the store's SEVERITIES, worst first (a test keeps them the same)."""

    error = "error"
    warning = "warning"
    info = "info"


class CheckFormat(str, Enum):
    """``check --format``: a table on stderr, JSON on stdout, or GitHub annotations."""

    table = "table"
    json = "json"
    github = "github"


#: numpy's seeding takes 0 .. 2**32 - 1; torch and random take those too.
SEED_LIMIT = 2**32


def require(ok: bool, option: str, value: object, words: str, example: str) -> None:
    """``option`` must be ``words`` ("a positive integer"); ``example`` is a good value."""
    if not ok:
        raise UsageError(f"{option} must be {words}, got {value}", hint=f"e.g. {option} {example}")


def positive_int(value: int | None, option: str, example: str) -> None:
    if value is not None:
        require(value >= 1, option, value, "positive", example)


def non_negative_int(value: int | None, option: str, example: str) -> None:
    if value is not None:
        require(value >= 0, option, value, "an integer >= 0", example)


def positive_finite(value: float | None, option: str, example: str) -> None:
    if value is not None:
        require(math.isfinite(value) and value > 0, option, value, "a positive number", example)


def one_of(value: str, option: str, choices: Sequence[str]) -> None:
    """``value`` must be one of ``choices`` (Typer's own choice type would print a framed
    panel)."""
    if value not in choices:
        raise UsageError(
            f"{option} must be one of {', '.join(choices)}, got {value!r}",
            hint=f"e.g. {option} {choices[-1]}",
        )


def seed(value: int, option: str = "--seed") -> None:
    require(0 <= value < SEED_LIMIT, option, value, f"an integer in 0 .. {SEED_LIMIT - 1}", "0")


def empty_option(command: Any, args: Sequence[str]) -> str | None:
    """The first option in ``args`` given an empty value (``--out ""``, ``--out=``), if any.

    Typer turns an empty path into ``Path(".")``, the current directory, so ``--out ""``
    would put a run next to the user's files; no option of stabscope means anything empty.
    Arguments after ``--`` belong to a training script and are left alone. ``command`` is
    the click command that will parse ``args``."""
    takes_value = {
        name
        for param in command.params
        # duck-typed: typer vendors its own click, whose Option is not click.Option
        if param.param_type_name == "option" and not param.is_flag and not param.count
        for name in (*param.opts, *param.secondary_opts)
    }
    for i, arg in enumerate(args):
        if arg == "--":
            return None
        name, equals, value = arg.partition("=")
        if equals and name in takes_value and not value:
            return name
        if arg in takes_value and i + 1 < len(args) and args[i + 1] == "":
            return arg
    return None


def output_file(path: Path, option: str, what: str | None = None) -> None:
    """Fail now, before any work, when ``path`` cannot be written: it is a directory, its
    directory is missing or is a file, or that directory refuses a new file (checked by
    creating and removing one: permission bits say nothing for root or a read-only mount).
    ``what`` names the file in the message ("the report to"); the option by default."""
    hint = f"choose a writable {option} path"
    what = what or option
    if path.is_dir():
        raise UsageError(
            f"cannot write {what} {path}: it is a directory", hint=f"{hint} (a file, not a folder)"
        )
    if _special(path):  # /dev/stdout or a named pipe: written straight through
        try:
            open(path, "ab").close()
        except OSError as err:
            raise UsageError(
                f"cannot write {what} {path}: {err.strerror or err}", hint=hint
            ) from None
        return
    parent = path.parent
    if not parent.exists():
        raise UsageError(
            f"cannot write {what} {path}: no directory {parent}",
            hint=f"create it first (mkdir -p {parent}), or {hint}",
        )
    if not parent.is_dir():
        raise UsageError(f"cannot write {what} {path}: {parent} is not a directory", hint=hint)
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".stabscope-probe-"):
            pass
    except OSError as err:
        raise UsageError(
            f"cannot write {what} {path}: {err.strerror or err} ({parent})", hint=hint
        ) from None


def _special(path: Path) -> bool:
    """A symlink, device or pipe: replacing it by rename would replace the link or the device
    node itself (``/dev/stdout``), so it is written through instead."""
    return path.is_symlink() or (path.exists() and not path.is_file() and not path.is_dir())


def write_output(path: Path, text: str, option: str, kept: str = "") -> None:
    """Write a file the user named with ``option``: atomically for a regular file (a failed
    write leaves no half file), straight through for ``/dev/stdout`` and the like. ``kept``
    says, in the hint, what is safe already."""
    from ..store.atomic import write_text_atomically

    try:
        if _special(path):
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)
        else:
            write_text_atomically(path, text)
    except OSError as err:
        raise UsageError(
            f"cannot write {option} {path}: {err.strerror or err}",
            hint=f"{kept}choose a writable {option} path",
        ) from None


__all__ = [
    "CheckFormat",
    "Severity",
    "empty_option",
    "non_negative_int",
    "output_file",
    "positive_finite",
    "positive_int",
    "require",
    "seed",
    "write_output",
]


def run_meta(run_dir: Path) -> Any:
    """The meta.json of the run in ``run_dir`` (a ``RunMeta``); bad input where it holds none
    that can be read."""
    from ..store import NotARunError, load_meta

    try:
        return load_meta(run_dir)
    except NotARunError as e:
        hint = getattr(e, "hint", "pass a directory written by `stabscope profile`")
        raise UsageError(str(e), hint=hint) from None
