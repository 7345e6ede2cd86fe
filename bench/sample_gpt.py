"""The sample GPT the speed benches train: its shape options, the model and a few batches.

One place for what ``overhead.py``, ``online_rules.py`` and ``flight_share.py`` measure on, so
their numbers stay comparable: Pre-LN, 4 heads, a 256-symbol successor task, shape from the
command line (default 6 layers, d=256, sequence 128, batch 8).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sample_models"))
import gpt

from stabscope.drivers.script import ScriptConfig


def add_shape_args(ap: argparse.ArgumentParser) -> None:
    """``--depth``, ``--width``, ``--seq-len`` and ``--batch-size`` of the benched model."""
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)


def sample_gpt(
    args: argparse.Namespace, device: torch.device, batches: int
) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """The model (seed 0) on ``device`` and its first ``batches`` batches, (batch, seq) each."""
    cfg = ScriptConfig(
        gpt.CONFIG
        | dict(depth=args.depth, width=args.width, heads=4, seq_len=args.seq_len,
               batch_size=args.batch_size, vocab=256, successors=4, norm="pre")
    )  # fmt: skip
    torch.manual_seed(0)
    model = gpt.model(cfg).to(device)
    data = gpt.batches(cfg)
    return model, [next(data).to(device) for _ in range(batches)]


def stepper(model, rec, batches, device):  # type: ignore[no-untyped-def]
    """A training step of ``model`` (Adam, lr 1e-4) through ``batches`` in turn, marked on
    ``rec``: ``step()`` returns its wall time, the device synchronised on both sides."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    state = {"i": 0}

    def step() -> float:
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss = gpt.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rec.step(loss=loss)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    return step


__all__ = ["add_shape_args", "gpt", "sample_gpt", "stepper"]
