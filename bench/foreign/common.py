"""Shared helpers of the foreign scripts: a loss log independent of stabscope, and data.

The runner (bench/foreign/run.py) tells each script where to write through the environment:
FOREIGN_LOSS_LOG is the path of the jsonl loss log, FOREIGN_RUN_DIR the run directory of a
script that opens its own Recorder. Without them, logs go to ./foreign-logs/NAME.jsonl.
"""

from __future__ import annotations

import json
import math
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

LOG_ENV = "FOREIGN_LOSS_LOG"
RUN_ENV = "FOREIGN_RUN_DIR"


class LossLog:
    """One json line per call: {"loss": value, **extra}; a non-finite value as its string
    ("nan", "inf"), so the log stays valid json."""

    def __init__(self, name: str) -> None:
        path = Path(os.environ.get(LOG_ENV) or Path("foreign-logs") / f"{name}.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.f = open(path, "w")  # noqa: SIM115 - open for the whole run, flushed per line

    def __call__(self, loss: torch.Tensor | float, **extra: torch.Tensor | float) -> None:
        v = float(loss.detach().float()) if torch.is_tensor(loss) else float(loss)
        d = {"loss": v if math.isfinite(v) else str(v)}
        for k, x in extra.items():
            d[k] = float(x)
        self.f.write(json.dumps(d) + "\n")
        self.f.flush()


def logged_cross_entropy(
    model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], log: LossLog
) -> torch.Tensor:
    """The classification loss of an (inputs, labels) batch, written to the script's own log
    first (the truth is read from that log, never from stabscope)."""
    x, y = batch
    value = torch.nn.functional.cross_entropy(model(x), y)
    log(value)
    return value


def run_dir(default: str) -> str:
    return os.environ.get(RUN_ENV) or default


def text_bytes(n: int = 400_000) -> torch.Tensor:
    """The first ``n`` bytes of this Python's standard library sources (real text on every
    machine, no download), as ascii codes clamped to 127: a (n,) long tensor."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    buf = b""
    for p in files:
        buf += p.read_bytes()
        if len(buf) > n:
            break
    data = torch.tensor(list(buf[:n]), dtype=torch.long)
    return data.clamp(max=127)


def unigram_entropy(data: torch.Tensor, vocab: int) -> float:
    """Entropy (nats) of the token frequencies: the loss of a model that ignores context."""
    c = torch.bincount(data.reshape(-1), minlength=vocab).float()
    p = c / c.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


SUCCESSORS = 2  # each token of the walk has two possible successors


def successor_table(vocab: int = 32) -> torch.Tensor:
    """(vocab, 2): the two successors of each token, fixed across scripts."""
    return torch.randint(vocab, (vocab, SUCCESSORS), generator=torch.Generator().manual_seed(1234))


def successor_walk(g: torch.Generator, table: torch.Tensor, bs: int, length: int) -> torch.Tensor:
    """(bs, length) random walks on ``table``: a uniform start, then a random successor."""
    x = torch.empty(bs, length, dtype=torch.long)
    x[:, 0] = torch.randint(table.shape[0], (bs,), generator=g)
    pick = torch.randint(SUCCESSORS, (bs, length), generator=g)
    for t in range(1, length):
        x[:, t] = table[x[:, t - 1], pick[:, t]]
    return x


def walk_unigram(vocab: int = 32) -> float:
    """The unigram entropy of long walks on the successor table (~2.85 nats for vocab 32)."""
    walks = successor_walk(torch.Generator().manual_seed(0), successor_table(vocab), 2000, 64)
    return unigram_entropy(walks[:, 1:], vocab)


def image_batches(
    bs: int = 64,
    classes: int = 10,
    size: int = 16,
    noise: float = 1.0,
    seed: int = 0,
    label_noise: float = 0.0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each class a fixed random smooth template; sample = template * random gain + noise.
    Yields x (bs, 3, size, size) and y (bs,)."""
    g = torch.Generator().manual_seed(1234)
    tmpl = torch.randn(classes, 3, size, size, generator=g)
    tmpl = torch.nn.functional.avg_pool2d(tmpl, 3, 1, 1) * 3
    g2 = torch.Generator().manual_seed(seed)
    while True:
        y = torch.randint(classes, (bs,), generator=g2)
        gain = 0.5 + torch.rand(bs, 1, 1, 1, generator=g2)
        x = tmpl[y] * gain + noise * torch.randn(bs, 3, size, size, generator=g2)
        if label_noise > 0:
            flip = torch.rand(bs, generator=g2) < label_noise
            y = torch.where(flip, torch.randint(classes, (bs,), generator=g2), y)
        yield x, y


UNIFORM_10 = math.log(10)  # a 10-class guess: the trivial baseline of the image classifiers
