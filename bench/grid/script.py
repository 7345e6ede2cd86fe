"""The grid's model script: one family on one task under one optimizer and lr schedule.

    stabscope profile bench/grid/script.py --steps 200 --set family=llama --set task=text \
        --set lr=3e-2 --set steps=200

Every grid run is this script with ``--set`` overrides (bench/grid/failures.py lists them).
The learning rate is a LambdaLR of the planned budget ``steps``, so the lr of every step is
known before training (``planned_lrs``):

    lr(s) = lr * warm(s) * ramp ** clip((s - a) / (b - a), 0, 1),  a = ramp_at * steps,
                                                                   b = ramp_end * steps
    warm(s) = min(1, (s + 1) / warmup)   (1 when warmup = 0)

``ramp`` > 1 grows the lr geometrically from the fraction ``ramp_at`` of the budget to
``ramp_end``, and holds it there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from bench.grid import families, tasks

CONFIG = {
    "family": "gpt",  # gpt | llama | gpt2 | bert | encdec | resconv | opt | neox | lstm
    "task": "succ",  # text | succ | reverse
    "depth": 2,
    "width": 64,
    "heads": 4,
    "norm": "pre",  # gpt: pre | post | deepnorm; encdec: pre | post
    "seq_len": 32,  # text, succ: tokens per sequence
    "vocab": 32,  # succ, reverse: symbols
    "successors": 2,  # succ
    "rev_len": 8,  # reverse: symbols to reverse
    "task_seed": 1234,
    "batch_size": 16,
    "optim": "adam",  # adam | sgd (momentum 0.9)
    "lr": 1e-3,
    "warmup": 0,
    "ramp": 1.0,
    "ramp_at": 0.0,
    "ramp_end": 1.0,
    "steps": 200,  # the planned budget the schedule is laid out on
    "out_scale": 1.0,  # output head weights x this after init (bad init)
    "init_gain": 1.0,  # resconv: residual-branch weights x this
    "init_std": 0.02,  # llama, gpt2, bert: initializer_range
}


def lr_factor(step: int, cfg) -> float:
    """The multiplier of ``cfg.lr`` at ``step`` (the LambdaLR lambda)."""
    warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup > 0 else 1.0
    start, end = cfg.ramp_at * cfg.steps, cfg.ramp_end * cfg.steps
    frac = min(1.0, max(0.0, (step - start) / max(1.0, end - start)))
    return warm * cfg.ramp**frac


def planned_lrs(cfg) -> list[float]:
    """The lr each of the ``cfg.steps`` steps trains with, before training."""
    return [cfg.lr * lr_factor(s, cfg) for s in range(cfg.steps)]


def model(cfg) -> torch.nn.Module:
    task = tasks.make_task(cfg)
    return families.build(cfg, task.vocab, task.length)


def batches(cfg):
    task = tasks.make_task(cfg)
    form = families.FORMS[cfg.family]
    for seq in task.stream(cfg.batch_size, seed=torch.initial_seed()):
        yield tasks.to_batch(task, seq, form)


def loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    logits = families.logits(model, batch)  # (B, T, vocab)
    y = batch["y"]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)


def optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    if cfg.optim == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    if cfg.optim == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr)
    raise ValueError(f"optim must be adam or sgd, not {cfg.optim!r}")


def scheduler(opt: torch.optim.Optimizer, cfg):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
