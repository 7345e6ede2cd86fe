"""Sparse gradients: embeddings with ``sparse=True`` (a recommender's tables) trained by
``SparseAdam`` beside an ``Adam`` for the dense layers, and by one ``Adagrad`` over all. Torch's
norms have no kernel for a sparse COO gradient; the recorder reads its coalesced values. Each
recorded value is checked against the dense gradient captured in the loop before the
optimizer step; and a list of embedding tables is no stack of layers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import stabscope
from stabscope import Recorder, RecorderConfig, Schedule
from stabscope.analysis.summary import layer_modules
from stabscope.rules import check_run

STEPS, TABLES = 6, 3


class Tables(nn.Module):
    """One sparse EmbeddingBag per feature, side by side, and a dense top."""

    def __init__(self) -> None:
        super().__init__()
        self.tables = nn.ModuleList(
            nn.EmbeddingBag(40, 8, mode="sum", sparse=True) for _ in range(TABLES)
        )
        self.top = nn.Sequential(nn.Linear(8 * TABLES, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: (features, batch, hot)
        bags = [t(ids[f]) for f, t in enumerate(self.tables)]  # each (batch, 8)
        return self.top(torch.cat(bags, 1)).squeeze(1)


def train(run, optimizers: str, preset: str) -> list[dict[str, torch.Tensor]]:
    """The run, and per step every parameter's gradient as a dense tensor."""
    torch.manual_seed(0)
    model = Tables()
    tables = [p for t in model.tables for p in t.parameters()]
    if optimizers == "two":
        opts = [
            torch.optim.SparseAdam(tables, lr=1e-2),
            torch.optim.Adam(model.top.parameters(), lr=1e-3),
        ]
    else:
        opts = [torch.optim.Adagrad(model.parameters(), lr=0.05)]
    seen = []
    config = RecorderConfig(preset=preset, schedule=Schedule(dense=STEPS, every=0))
    g = torch.Generator().manual_seed(1)
    with Recorder(model, run, config) as rec:
        for _ in range(STEPS):
            ids = torch.randint(0, 40, (TABLES, 32, 3), generator=g)  # repeats within a bag
            y = (ids.sum((0, 2)) % 2).float()
            loss = nn.functional.binary_cross_entropy_with_logits(model(ids), y)
            for o in opts:
                o.zero_grad()
            loss.backward()
            seen.append({n: p.grad.to_dense().clone() for n, p in model.named_parameters()})
            for o in opts:
                o.step()
            rec.step(loss)
    return seen


def values(run, metric: str) -> dict[tuple[int, str], float]:
    df = stabscope.load_run(run, metrics=[metric])
    return {(int(s), str(m)): float(v) for s, m, v in zip(df.step, df.module, df.value)}


@pytest.mark.parametrize("optimizers", ["two", "one"])
def test_sparse_gradients_are_recorded_exactly(tmp_path, optimizers):
    run = tmp_path / optimizers
    seen = train(run, optimizers, "full")
    meta = stabscope.read_meta(run)
    assert "tool_error" not in meta and meta["status"] == "complete"
    assert meta["steps"] == meta["recorded_steps"] == STEPS
    assert seen[0]["tables.0.weight"].count_nonzero() > 0
    norms, means = values(run, "param_grad_norm"), values(run, "param_grad_mean")
    total = values(run, "grad_norm")
    for step, grads in enumerate(seen):
        for name, grad in grads.items():
            # Coalesced values: a row looked up twice in a bag counts once, summed.
            assert norms[(step, name)] == pytest.approx(float(grad.norm()), rel=1e-5)
            assert means[(step, name)] == pytest.approx(float(grad.mean()), rel=1e-4, abs=1e-9)
        want = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
        assert total[(step, "__run__")] == pytest.approx(want, rel=1e-5)


def test_a_list_of_embedding_tables_is_no_stack_of_layers(tmp_path):
    train(tmp_path / "run", "two", "standard")
    meta = stabscope.read_meta(tmp_path / "run")
    assert not any(name.startswith("tables") for name in layer_modules(meta))
    assert "gradient-growth" not in {f.rule for f in check_run(tmp_path / "run").findings}
