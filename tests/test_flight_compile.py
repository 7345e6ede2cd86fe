"""The flight recorder on a compiled model: its hooks are traced into the graph (no graph
break, no recompilation per step) and every step's block output statistics equal those of the
same training run eagerly, measured by hooks written in the test; the script's own graph
break (two graphs, each with its own backward) leaves training intact."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import stabscope
from stabscope import Recorder, RecorderConfig, Schedule
from stabscope.probes.flight import COMPILED_NOTE
from tests.conftest import sample_gpt
from tests.test_flight import WATCHED, reference_hooks, table

STEPS = 8


def train(model, loss_of, rec=None, on_step=None):
    opt = torch.optim.SGD(model.parameters(), 1e-2)
    for step in range(STEPS):
        loss = loss_of(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rec is not None:
            rec.step(loss=loss)
        if on_step is not None:
            on_step(step)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_model_gets_every_step_statistics_with_no_graph_break(tmp_path, backend):
    model, loss_of = sample_gpt("pre")
    twin = copy.deepcopy(model)
    seen, handles = reference_hooks(twin, WATCHED)
    expected: dict[tuple[int, str], float] = {}

    def keep(step):
        expected.update({(step, name): v for name, v in seen["act"].items()})
        seen["act"].clear()
        seen["grad"].clear()

    train(twin, loss_of, on_step=keep)
    for h in handles:
        h.remove()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend)
    cfg = RecorderConfig(schedule=Schedule(dense=1, every=0), flight_every=3)
    with Recorder(compiled, tmp_path / "r", cfg) as rec:
        train(compiled, loss_of, rec)
    assert sum(counters["graph_break"].values()) == 0
    # Step 0 (recorded, module hooks on) and the rest (flight hooks only): one recompilation
    # when the hooks change, none per step.
    assert counters["stats"]["unique_graphs"] <= 3
    df = stabscope.load_run(tmp_path / "r")
    act = table(df, "flight_act_rms")
    assert {s for s, _ in act} == set(range(1, STEPS)) and {m for _, m in act} == set(WATCHED)
    for key, value in act.items():
        assert value == pytest.approx(expected[key], rel=1e-4), key
    # No gradient statistics from compiled code (the note says why).
    assert table(df, "flight_grad_rms") == {}
    assert COMPILED_NOTE in stabscope.read_meta(tmp_path / "r")["notes"]
