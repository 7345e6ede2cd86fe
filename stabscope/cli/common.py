"""What every ``stabscope`` sub-command shares: the Typer app, the stderr console, the error exit.

Commands live in their own modules (``cli.py`` for the core ones, ``cli_<name>.py`` for the rest)
and register on ``app`` when ``cli.py`` imports them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from ..errors import ScriptError, UsageError
from ..store import StabscopeWarning
from ..version import __version__


class _Commands(TyperGroup):
    """The command group; it refuses an empty option value before the command parses it,
    and turns click's parse errors (an unknown option, a value not among the choices) into
    the one ``error:`` line and ``hint:`` line of every other bad input."""

    def resolve_command(self, ctx: Any, args: list[str]) -> tuple[str | None, Any, list[str]]:
        from .values import empty_option

        ctx.meta["stabscope.args"] = list(args)  # what the command will parse, for hints
        try:
            name, command, rest = super().resolve_command(ctx, args)
        except Exception as e:  # no such command (click's words add "Did you mean ...")
            if not _is_parse_error(e):
                raise
            error = UsageError(_first_line(e.format_message()), hint=self._commands_hint())
            raise fail(error) from None
        option = None if command is None else empty_option(command, rest)
        if option is not None:
            raise fail(
                UsageError(
                    f"{option} is empty",
                    hint=f"give {option} a value, or leave it out for its default",
                )
            )
        return name, command, rest

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        """``stabscope``'s own options (``--bogus``) fail as one line too, not click's box."""
        try:
            return super().parse_args(ctx, args)
        except Exception as e:
            if not _is_parse_error(e) or type(e).__name__ == "NoArgsIsHelpError":
                raise
            error = UsageError(_first_line(e.format_message()), hint=self._commands_hint())
            raise fail(error) from None

    def _commands_hint(self) -> str:
        return f"the commands: {', '.join(self.list_commands(None))}; see `stabscope --help`"

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as e:
            if not _is_parse_error(e):
                raise
            args = ctx.meta.get("stabscope.args", [])
            error = UsageError(_first_line(e.format_message()), hint=parse_hint(e, args))
            raise fail(error) from None


def _is_parse_error(e: Exception) -> bool:
    # duck-typed: typer vendors its own click, whose exceptions are not click's
    return hasattr(e, "format_message") and getattr(e, "exit_code", 0) == 2


def _first_line(text: str) -> str:
    text = text.replace("Value error, ", "")  # typer's wording for a choice it refused
    # click's suggestion when nothing is like the unknown option: noise beside our hint
    text = text.replace(" (Possible options: --help)", "")
    return text.strip().splitlines()[0] if text.strip() else "bad command line"


def parse_hint(error: Any, args: list[str]) -> str:
    """What to do about a parse error of ``stabscope COMMAND ARGS``. An unknown option after
    a script path is most likely the script's own (``train.py --max_iters 10``): those go
    after ``--``, which stabscope passes to the script untouched."""
    command = args[0] if args else ""
    option = getattr(error, "option_name", None)
    if option is not None and type(error).__name__ == "NoSuchOption":
        at = next((i for i, a in enumerate(args) if a.split("=")[0] == option), len(args))
        scripts = [a for a in args[1:at] if a.endswith(".py")]
        if scripts:
            return (
                f"if {option} is the script's own, put it after `--`: stabscope {command} "
                f"{scripts[0]} [OPTIONS] -- {option} ..."
            )
    return f"see `stabscope {command} --help`".replace("  ", " ")


app = typer.Typer(
    cls=_Commands,
    name="stabscope",
    help="Stability diagnostics for PyTorch models: record, inspect, summarise, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
err = Console(stderr=True, highlight=False)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"stabscope {__version__}")
        raise typer.Exit(0)


@app.callback()
def _options(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print stabscope's version and exit.",
    ),
) -> None:
    """Stability diagnostics for PyTorch models: record, inspect, summarise, report."""


#: ``--quiet`` of every command that says more than its result: progress bars, summaries,
#: tables and notes go; errors, ``warning:`` lines and the verdict line that CI reads stay.
Quiet = Annotated[
    bool,
    typer.Option(
        "--quiet", "-q", help="Only errors, warnings and the verdict line (no progress, no tables)."
    ),
]


@contextlib.contextmanager
def stdout_for_data_only() -> Iterator[None]:
    """Inside: whatever is written to stdout (a script's ``print``, a library's C code
    writing to file descriptor 1) goes to stderr, so that stdout carries only the data the
    command prints afterwards (``--json``)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def fail(error: UsageError) -> typer.Exit:
    """Print the error line and its hint to stderr; exit 2 unless the script set a code."""
    # Messages quote paths and names as given ("runs/exp[lr=1e-3]"): text, never markup.
    err.print(f"[bold red]error:[/] {escape(error.message)}", soft_wrap=True)
    if error.hint:
        err.print(f"[dim]hint:[/] {escape(error.hint)}", soft_wrap=True)
    return typer.Exit(error.exit_code if isinstance(error, ScriptError) else 2)


_python_showwarning = warnings.showwarning


def warning_line(text: str) -> None:
    """One ``warning:`` line on stderr."""
    err.print(f"[yellow]warning:[/] {escape(text)}", soft_wrap=True)


def finding_line(text: str) -> None:
    """One ``error:`` line on stderr: an error finding that arrived while the run trained
    (only those act), named by its severity as ``check`` names it."""
    err.print(f"[red]error:[/] {escape(text)}", soft_wrap=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """What a reader skipped in a run (a part it cannot read) as one ``warning:`` line on
    stderr, like the report's warnings; other warnings as Python shows them."""
    if issubclass(category, StabscopeWarning):
        warning_line(str(message))
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


warnings.showwarning = _show_warning
