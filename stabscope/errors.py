"""Every error a user of stabscope can meet, and its one warning category, in one module.

``UsageError`` and its subclasses mean "the input is wrong": the CLI prints one line with a
hint and exits 2. The others are what the library raises to callers (``load_run`` on a
directory that is no run, a recorder pointed at a directory that holds one); the modules
that raise them re-export them, so ``stabscope.NotARunError`` and
``stabscope.store.rundir.RunExistsError`` keep working. No imports: every layer may use it.

Not here: exceptions that never leave the module that raises them (``LockHeld``,
``CannotPlan``, ``NotCovered``, ``StopScript``): each is caught and turned into one of these.
"""

from __future__ import annotations


class HintedError(Exception):
    """An error with a ``hint``: what to do about it, also in ``str()``, which stays one
    line."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class UsageError(HintedError):
    """Bad input from the user. ``hint`` says what to do about it."""


class ScriptError(UsageError):
    """The user's script raised; ``exit_code`` is passed through when the script set one."""

    def __init__(self, message: str, hint: str = "", exit_code: int = 2) -> None:
        super().__init__(message, hint)
        self.exit_code = exit_code


class TrainingError(ScriptError):
    """The script trained, but what it trains cannot be recorded for a fault of the training
    itself (its optimizer holds no parameter of any module it called): the gate's exit code
    1, not bad input's 2."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message, hint, exit_code=1)


class ConfigError(UsageError, ValueError):
    """A ``[tool.stabscope]`` table that cannot be used: names the file, the key and what the
    key takes. A ``ValueError`` too, as config errors always were."""

    def __init__(self, message: str, source: str) -> None:
        super().__init__(
            message, hint=f"fix it in {source} (the keys: README, Recording your own training loop)"
        )

    def __str__(self) -> str:  # one line where it is caught as a ValueError and re-worded
        return self.message


class OptionError(UsageError, TypeError, ValueError):
    """A keyword of ``Recorder`` or a callback that does not exist (a ``TypeError``, as Python
    says for an unexpected keyword) or takes no such value (a ``ValueError``)."""


class NotARunError(ValueError):
    """The path is not a stabscope run directory."""


class MetaError(NotARunError):
    """``meta.json`` exists but cannot be read as a run's description."""

    hint = "meta.json was damaged or edited: restore it from a copy, or record the run again"


class FindingsError(ValueError):
    """findings.json exists but cannot be read as a list of findings."""


class RunExistsError(HintedError, FileExistsError):
    """The output directory already holds a run. ``hint`` says what to do about it:
    ``force=True``, or another directory."""


class RunLockedError(RunExistsError):
    """The output directory is being written by a live writer; ``force`` does not help."""


class NestedRunError(OSError):
    """The output directory lies inside another run directory."""


class RunWriteError(OSError):
    """Writing a file of the run format failed (a full disk, a lost mount)."""


class DescriptionError(ValueError):
    """A model description the theory cannot use; the message says which field and why."""


class StabscopeWarning(UserWarning):
    """Something in a run could not be read and was skipped."""


def warn(message: str, stacklevel: int = 2) -> None:
    """``warnings.warn(message, StabscopeWarning)`` that never raises into its caller. Under a
    filter that turns warnings into errors (``python -W error``, pytest's ``-W error``) the
    line goes to stderr instead: a monitoring tool's warning must not end a training run, nor
    turn a gate's read of a damaged run into a rule that failed. ``stacklevel`` counts from
    the caller of this function, as ``warnings.warn``'s does from its own."""
    import sys
    import warnings

    try:
        warnings.warn(message, StabscopeWarning, stacklevel=stacklevel + 1)
    except Warning:
        print(f"warning: {message}", file=sys.stderr)


__all__ = [
    "ConfigError",
    "DescriptionError",
    "FindingsError",
    "MetaError",
    "NestedRunError",
    "NotARunError",
    "OptionError",
    "RunExistsError",
    "RunLockedError",
    "RunWriteError",
    "ScriptError",
    "StabscopeWarning",
    "UsageError",
]
