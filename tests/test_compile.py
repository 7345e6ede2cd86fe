"""torch.compile: recording never breaks a compiled model. Hooks return at once while Dynamo
traces, so compiled modules get no moments (and are listed as never fired); parameter
statistics, update ratios, loss and lr are still recorded, and training is unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import stabscope
from stabscope import Schedule
from tests.conftest import batch_maker, mlp, train


@pytest.mark.slow
def test_compiled_model_trains_identically_and_keeps_parameter_stats(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model)
    make = batch_maker(6, 3)
    with stabscope.Recorder(compiled, tmp_path, schedule=Schedule(dense=2, every=3)) as rec:
        losses = train(compiled, 4, make, rec)
    reference = train(torch.compile(twin), 4, make)
    assert losses == pytest.approx(reference, rel=1e-6)
    df = stabscope.load_run(tmp_path)
    metrics = set(df.metric.astype(str))
    assert {"param_norm", "param_grad_norm", "update_ratio", "loss", "lr"} <= metrics
    assert sorted(df[df.metric == "loss"].step) == [0, 1, 2, 3]
    meta = stabscope.read_meta(tmp_path)
    assert meta["status"] == "complete"
    assert "0" in meta["hooks_never_fired"]["forward"]


@pytest.mark.slow
def test_recorder_hooks_add_no_graph_break(tmp_path):
    # The hooks ask Dynamo whether it is tracing before anything it cannot trace (the
    # backward check): asked the other way round, every hooked module broke the graph.
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(mlp(), backend="eager")
    with stabscope.Recorder(compiled, tmp_path, schedule=Schedule(dense=2, every=3)) as rec:
        train(compiled, 4, batch_maker(6, 3), rec)
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] >= 1  # Dynamo did compile the model
