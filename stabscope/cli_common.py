"""What every ``stabscope`` sub-command shares: the Typer app, the stderr console, the error exit.

Commands live in their own modules (``cli.py`` for the core ones, ``cli_<name>.py`` for the rest)
and register on ``app`` when ``cli.py`` imports them.
"""

from __future__ import annotations

import warnings

import typer
from rich.console import Console
from rich.markup import escape

from .errors import ScriptError, UsageError
from .store import StabscopeWarning

app = typer.Typer(
    name="stabscope",
    help="Stability diagnostics for PyTorch models: record, inspect, summarise, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
err = Console(stderr=True, highlight=False)


def fail(error: UsageError) -> typer.Exit:
    """Print the error line and its hint to stderr; exit 2 unless the script set a code."""
    err.print(f"[bold red]error:[/] {error.message}", markup=True, soft_wrap=True)
    if error.hint:
        err.print(f"[dim]hint:[/] {error.hint}", soft_wrap=True)
    return typer.Exit(error.exit_code if isinstance(error, ScriptError) else 2)


_python_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """What a reader skipped in a run (a part it cannot read) as one ``warning:`` line on
    stderr, like the report's warnings; other warnings as Python shows them."""
    if issubclass(category, StabscopeWarning):
        err.print(f"[yellow]warning:[/] {escape(str(message))}", soft_wrap=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


warnings.showwarning = _show_warning
