"""Errors that mean "the input is wrong": the CLI prints one line with a hint and exits 2."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user. ``hint`` says what to do about it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class ScriptError(UsageError):
    """The user's script raised; ``exit_code`` is passed through when the script set one."""

    def __init__(self, message: str, hint: str = "", exit_code: int = 2) -> None:
        super().__init__(message, hint)
        self.exit_code = exit_code


class ConfigError(UsageError, ValueError):
    """A ``[tool.stabscope]`` table that cannot be used: names the file, the key and what the
    key takes. A ``ValueError`` too, as config errors always were."""

    def __init__(self, message: str, source: str) -> None:
        super().__init__(
            message, hint=f"fix it in {source} (the keys: README, Recording your own training loop)"
        )

    def __str__(self) -> str:  # one line where it is caught as a ValueError and re-worded
        return self.message
