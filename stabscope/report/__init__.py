"""Rendering runs for people: the terminal summary (and, later, the HTML report)."""
