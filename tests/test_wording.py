"""One-line messages cut from an exception's text: whole words, within the limit."""

from __future__ import annotations

from stabscope.wording import MESSAGE_CHARS, counted, first_line


def test_a_long_line_is_cut_at_a_words_end_within_the_limit():
    # torch's message for reentrant checkpointing, longer than a note keeps.
    words = (
        "When use_reentrant=True, torch.utils.checkpoint is incompatible with .grad() " * 6
    ).split()
    message = "\n  " + " ".join(words) + "\nsecond line"
    line = first_line(message, limit=120)
    assert len(line) <= 120 and line.endswith("...")
    kept = line[:-3].split(" ")
    assert kept == words[: len(kept)]  # every kept word whole, in order
    assert len(" ".join(words[: len(kept) + 1])) > 117  # and no whole word more fits


def test_a_cut_that_falls_on_a_space_keeps_the_word_before_it():
    line = "a" * 50 + " " + "b" * 6 + " " + "c" * 20  # the 57th character ends the b's
    assert first_line(line, limit=60) == "a" * 50 + " " + "b" * 6 + "..."


def test_a_short_line_is_kept_whole_and_a_word_longer_than_the_limit_is_cut():
    assert first_line("\n\n  short message  \nmore") == "short message"
    assert first_line("x" * (MESSAGE_CHARS + 50)) == "x" * (MESSAGE_CHARS - 3) + "..."
    assert counted(1, "step") == "1 step" and counted(2, "step") == "2 steps"
