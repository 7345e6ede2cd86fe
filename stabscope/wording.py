"""Counted nouns in messages: "1 finding", "3 findings". Torch-free, for the read side and
the CLI alike."""

from __future__ import annotations


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless n is 1."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


__all__ = ["counted"]
