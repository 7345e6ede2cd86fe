"""Shared helpers: small real models and a reference training loop."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
sys.path.insert(0, str(SAMPLES))


def train(
    model: nn.Module,
    steps: int,
    make_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    rec=None,
    lr: float = 1e-2,
    before_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Plain Adam training on MSE; marks steps on ``rec`` when given. Returns the losses.

    ``before_step(step)`` runs at the start of every step (to check or break things there).
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        x, y = make_batch(step)
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rec is not None:
            rec.step(loss=loss)
        losses.append(loss.item())
    return losses


def record_steps(
    model: nn.Module,
    run: Path,
    forward,
    opt,
    steps: int,
    *config,
    probe_forward: bool = True,
    **options,
) -> Path:
    """``steps`` optimizer steps on the loss ``forward(model)``, recorded into ``run`` by a
    Recorder with ``forward`` as its probe forward (none without ``probe_forward``: the
    structure then comes from step 0's own forward); ``config``, ``options``: the Recorder's
    other arguments. Returns ``run``."""
    import stabscope

    probe = forward if probe_forward else None
    with stabscope.Recorder(model, run, *config, forward=probe, **options) as rec:
        for _ in range(steps):
            loss = forward(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    return run


def batch_maker(d_in: int, d_out: int, batch: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    data = [
        (torch.randn(batch, d_in, generator=g), torch.randn(batch, d_out, generator=g))
        for _ in range(64)
    ]
    return lambda step: data[step % len(data)]


def mlp(d_in: int = 6, hidden: int = 12, d_out: int = 3, inplace: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.ReLU(inplace=inplace),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, d_out),
    )


def sample_gpt(norm: str, depth: int = 3):
    """The sample GPT (sample_models/gpt.py), small, and its loss on one fixed batch."""
    import gpt

    from stabscope.drivers.script import ScriptConfig

    cfg = ScriptConfig(
        gpt.CONFIG | {"depth": depth, "norm": norm, "width": 32, "seq_len": 8, "batch_size": 2}
    )
    torch.manual_seed(0)
    model = gpt.model(cfg)
    batch = next(gpt.batches(cfg))
    return model, lambda m: gpt.loss(m, batch)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture(params=["numba", "torch"])
def kernel_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test on the host's numba kernels (where numba is installed) and on torch's
    path: the two compute the same statistics by different code."""
    from stabscope.probes.kernels import host_kernels

    numba = request.param == "numba" and host_kernels.AVAILABLE
    monkeypatch.setattr(host_kernels, "AVAILABLE", numba)
    return request.param
