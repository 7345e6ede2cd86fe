"""Counted nouns in messages: "1 finding", "3 findings". Torch-free, for the read side and
the CLI alike."""

from __future__ import annotations


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless n is 1."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


#: How much of an exception's message a one-line report keeps (``first_line``).
MESSAGE_CHARS = 300


def first_line(message: str, limit: int = MESSAGE_CHARS) -> str:
    """The first non-empty line of ``message``, cut to ``limit`` characters, at a word's end
    where one is near the cut (never mid-word in a note that names an API)."""
    line = next((part.strip() for part in message.splitlines() if part.strip()), "")
    if len(line) <= limit:
        return line
    cut = line[: limit - 3]
    space = cut.rfind(" ")
    if line[limit - 3] != " " and space >= limit // 2:  # the cut is inside a word
        cut = cut[:space]
    return cut.rstrip() + "..."


__all__ = ["MESSAGE_CHARS", "counted", "first_line"]
