"""Counted nouns in messages: "1 finding", "3 findings". Torch-free, for the read side and
the CLI alike."""

from __future__ import annotations


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless n is 1."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


__all__ = ["counted"]


#: How much of an exception's message a one-line report keeps (``first_line``).
MESSAGE_CHARS = 300


def first_line(message: str, limit: int = MESSAGE_CHARS) -> str:
    """The first non-empty line of ``message``, cut to ``limit`` characters."""
    line = next((part.strip() for part in message.splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[: limit - 3].rstrip() + "..."
