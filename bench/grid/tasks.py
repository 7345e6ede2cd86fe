"""The grid's tasks: token streams with a known unigram baseline.

Every task yields sequences ``seq`` (B, L+1) of token ids and names a context length P: the
tokens ``seq[:, :P]`` are given, the rest are predicted. A family sees a task in one of two
forms (``to_batch``):

    lm   decoder-only: x = seq[:, :-1], y = seq[:, 1:]; targets inside the context are
         ignored (-100) when the task says so (reverse: only the reversed half is scored)
    s2s  encoder-decoder: src = seq[:, :P], x = seq[:, P-1:-1], y = seq[:, P:]

The unigram baseline of a task in a form is the entropy (nats) of the marginal of its scored
targets, counted on batches drawn from a fixed seed: the loss of a model that predicts the
token frequencies and nothing else. Learning means getting below it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch

IGNORE = -100


@lru_cache(maxsize=1)
def text_corpus(max_bytes: int = 2_000_000) -> torch.Tensor:
    """Python's own standard library (the top-level ``*.py`` of the running interpreter), as
    7-bit bytes (others become 127), sorted by file name: real text on every machine that
    runs this, with no download. (N,) uint8."""
    data = bytearray()
    for path in sorted(Path(os.__file__).parent.glob("*.py")):
        data += path.read_bytes()
        if len(data) >= max_bytes:
            break
    raw = torch.frombuffer(bytearray(data[:max_bytes]), dtype=torch.uint8)
    return torch.where(raw < 128, raw, torch.full_like(raw, 127))


class Task:
    """A stream of (B, L+1) sequences; ``context`` and ``mask_context`` as in the module doc."""

    name = "task"
    vocab = 0
    length = 2  # L + 1
    context = 1
    mask_context = False

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def sample(self, batch: int, g: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def stream(self, batch: int, seed: int) -> Iterator[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        while True:
            yield self.sample(batch, g)


class Text(Task):
    """Byte-level language model over the standard library's sources (vocabulary 128)."""

    name, vocab = "text", 128

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.length = cfg.seq_len + 1
        self.context = cfg.seq_len // 2
        self.corpus = text_corpus()

    def sample(self, batch: int, g: torch.Generator) -> torch.Tensor:
        start = torch.randint(len(self.corpus) - self.length, (batch,), generator=g)
        idx = start[:, None] + torch.arange(self.length)
        return self.corpus[idx].long()


class Successor(Task):
    """sample_models/gpt.py's task: each of ``vocab`` tokens has ``successors`` allowed next
    tokens, fixed by ``task_seed``, chosen uniformly (optimal loss ln(successors))."""

    name = "succ"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.vocab, self.length, self.context = cfg.vocab, cfg.seq_len + 1, cfg.seq_len // 2
        g = torch.Generator().manual_seed(cfg.task_seed)
        self.table = torch.stack(
            [torch.randperm(cfg.vocab, generator=g)[: cfg.successors] for _ in range(cfg.vocab)]
        )  # (vocab, successors)

    def sample(self, batch: int, g: torch.Generator) -> torch.Tensor:
        seq = torch.empty(batch, self.length, dtype=torch.long)
        seq[:, 0] = torch.randint(self.vocab, (batch,), generator=g)
        choice = torch.randint(self.table.shape[1], (batch, self.length - 1), generator=g)
        for t in range(self.length - 1):
            seq[:, t + 1] = self.table[seq[:, t], choice[:, t]]
        return seq


class Reverse(Task):
    """``n`` random symbols, a separator, then the symbols reversed; only the reversed half is
    scored. Vocabulary: ``vocab`` symbols + the separator."""

    name, mask_context = "reverse", True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.n = cfg.rev_len
        self.vocab, self.sep, self.context = cfg.vocab + 1, cfg.vocab, self.n + 1
        self.length = 2 * self.n + 1

    def sample(self, batch: int, g: torch.Generator) -> torch.Tensor:
        x = torch.randint(self.sep, (batch, self.n), generator=g)
        sep = torch.full((batch, 1), self.sep, dtype=torch.long)
        return torch.cat([x, sep, x.flip(1)], dim=1)  # (B, 2n+1)


TASKS = {t.name: t for t in (Text, Successor, Reverse)}


def make_task(cfg) -> Task:
    if cfg.task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, not {cfg.task!r}")
    return TASKS[cfg.task](cfg)


def to_batch(task: Task, seq: torch.Tensor, form: str) -> dict[str, torch.Tensor]:
    """One (B, L+1) sequence batch in the family's form: {"x", "y"} or {"src", "x", "y"}."""
    p = task.context
    if form == "s2s":
        return {"src": seq[:, :p], "x": seq[:, p - 1 : -1], "y": seq[:, p:]}
    y = seq[:, 1:].clone()
    if task.mask_context:
        y[:, : p - 1] = IGNORE
    return {"x": seq[:, :-1], "y": y}


def unigram_baseline(task: Task, form: str, batches: int = 200, batch: int = 64) -> float:
    """Entropy (nats) of the scored targets' marginal, on batches from a fixed seed."""
    counts = torch.zeros(task.vocab, dtype=torch.float64)
    stream = task.stream(batch, seed=987654321)
    for _ in range(batches):
        y = to_batch(task, next(stream), form)["y"]
        counts += torch.bincount(y[y != IGNORE], minlength=task.vocab).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def uniform_loss(task: Task) -> float:
    return math.log(task.vocab)
