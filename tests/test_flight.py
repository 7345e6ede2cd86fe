"""The flight recorder: every step's block, stem and head statistics against hooks written in
the test, the exact first non-finite leaf and step (forward and backward) between scheduled
steps, the nonfinite rule's finding, the config switch and the hook point for other scalars."""

from __future__ import annotations

import math

import pytest
import torch

import stabscope
from stabscope import Recorder, RecorderConfig, Schedule
from stabscope.errors import ConfigError
from stabscope.record.config import config_from_mapping
from tests.conftest import sample_gpt
from tests.rule_runs import checked

SPARSE = Schedule(dense=2, every=5)  # recorded: 0, 1, 5, 10; the rest only by the flight
LIGHT = {"schedule": SPARSE, "structure_probes": False, "sharpness": False}
WATCHED = ["tok", "pos", "blocks.0", "blocks.1", "blocks.2", "ln_f", "head"]


def rms(t: torch.Tensor) -> float:
    return t.detach().double().pow(2).mean().sqrt().item()


def reference_hooks(model, names):
    """Forward hooks written here: per step, the rms of each named module's output and of the
    gradient w.r.t. it (the module's first training call)."""
    seen: dict[str, dict[str, float]] = {"act": {}, "grad": {}}
    modules = dict(model.named_modules())

    def hook(name):
        def fn(m, args, out):
            if torch.is_grad_enabled() and m.training and name not in seen["act"]:
                seen["act"][name] = rms(out)

                def grad_hook(g):
                    seen["grad"].setdefault(name, rms(g))

                out.register_hook(grad_hook)

        return fn

    return seen, [modules[n].register_forward_hook(hook(n)) for n in names]


def train(model, loss_of, rec, steps, before=None):
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for step in range(steps):
        if before is not None:
            before(step)
        loss = loss_of(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.step(loss=loss)


def table(df, metric):
    rows = df[df.metric == metric]
    return {(int(s), str(m)): float(v) for s, m, v in zip(rows.step, rows.module, rows.value)}


@pytest.mark.slow
def test_every_step_block_rms_matches_hooks_and_the_scheduled_probe(tmp_path):
    model, loss_of = sample_gpt("pre")
    seen, handles = reference_hooks(model, WATCHED)
    expected: dict[str, dict[tuple[int, str], float]] = {"act": {}, "grad": {}}

    def before(step):
        for kind in ("act", "grad"):
            for name, value in seen[kind].items():
                expected[kind][(step - 1, name)] = value
            seen[kind].clear()

    cfg = RecorderConfig(**LIGHT, flight_every=4)
    with Recorder(model, tmp_path / "r", cfg) as rec:
        train(model, loss_of, rec, 12, before)
        before(12)
    for h in handles:
        h.remove()
    df = stabscope.load_run(tmp_path / "r")
    act, grad = table(df, "flight_act_rms"), table(df, "flight_grad_rms")
    # From step 1 on (the structure is learned from step 0), every step, recorded or not.
    assert {s for s, _ in act} == set(range(1, 12))
    assert {m for _, m in act} == set(WATCHED)
    for key, value in act.items():
        assert value == pytest.approx(expected["act"][key], rel=1e-5), key
    for key, value in grad.items():
        assert value == pytest.approx(expected["grad"][key], rel=1e-5), key
    assert set(grad) == {k for k in expected["grad"] if k[0] >= 1}
    # Same definition as the scheduled probe's act_rms at the steps both record.
    scheduled = table(df[df.phase == "train"], "act_rms")
    both = [k for k in act if k in scheduled]
    assert {s for s, _ in both} == {1, 5, 10}
    for key in both:
        assert act[key] == pytest.approx(scheduled[key], rel=1e-6)
    assert (
        not table(df, "flight_act_nonfinite")
        or max(table(df, "flight_act_nonfinite").values()) == 0
    )
    # One transfer per ring of 4 steps (1-4, 5-8, 9-11 at close), each written as a part.
    meta = stabscope.read_meta(tmp_path / "r")
    assert meta["first_nonfinite"] == {} and meta["status"] == "complete"


def first_nonfinite_leaf(model, step_of, poison_step):
    """HF DebugUnderflowOverflow's answer, written here: at ``poison_step``, the first leaf
    module, in firing order, whose output holds a NaN/Inf."""
    found: list[str] = []

    def hook(name):
        def fn(m, args, out):
            if step_of[0] == poison_step and not found and not torch.isfinite(out).all():
                found.append(name)

        return fn

    handles = [
        m.register_forward_hook(hook(n)) for n, m in model.named_modules() if not any(m.children())
    ]
    return found, handles


@pytest.mark.slow
def test_weight_poisoned_between_scheduled_steps_is_found_at_its_leaf_and_step(tmp_path):
    model, loss_of = sample_gpt("pre")
    step_of = [0]
    found, handles = first_nonfinite_leaf(model, step_of, 7)

    def before(step):
        step_of[0] = step
        if step == 7:  # step 7 is not on the schedule
            with torch.no_grad():
                model.blocks[1].mlp.fc.weight[0, 0] = math.inf

    with Recorder(model, tmp_path / "r", RecorderConfig(**LIGHT)) as rec:
        train(model, loss_of, rec, 9, before)
    for h in handles:
        h.remove()
    assert found == ["blocks.1.mlp.fc"]
    meta = stabscope.read_meta(tmp_path / "r")
    forward = meta["first_nonfinite"]["forward"]
    assert (forward["module"], forward["step"]) == ("blocks.1.mlp.fc", 7)
    assert (forward["block"], forward["found_by"]) == ("blocks.1", "replay")
    df = stabscope.load_run(tmp_path / "r")
    marker = df[df.metric == "first_nonfinite_forward"]
    assert (int(marker.step.min()), str(marker[marker.step == 7].module.iloc[0])) == (
        7,
        "blocks.1.mlp.fc",
    )
    (finding,) = [f for f in checked(tmp_path / "r").findings if f.rule == "nonfinite"]
    assert (finding.module, finding.step, finding.metric) == (
        "blocks.1.mlp.fc",
        7,
        "flight_act_nonfinite",
    )
    # The flight flags show it first in blocks.1, at step 7 and not before.
    flags = table(df, "flight_act_nonfinite")
    assert flags[(7, "blocks.1")] == 1 and flags[(7, "blocks.0")] == 0
    assert max(v for (s, _), v in flags.items() if s < 7) == 0


class TrainingOnlyNaN(torch.nn.Module):
    """GELU whose output gets a NaN at step ``at`` in training mode only, on its first
    ``calls`` calls of that step (a NaN a replay in the same mode makes again when ``calls``
    is unbounded, and never makes again when it is 1)."""

    def __init__(self, step_of: list[int], at: int, calls: float) -> None:
        super().__init__()
        self.step_of, self.at, self.calls, self.made = step_of, at, calls, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.gelu(x)
        if self.training and self.step_of[0] == self.at and self.made < self.calls:
            self.made += 1
            y = y.clone()
            y[0, 0, 0] = math.nan
        return y


def poisoned_forward(tmp_path, at: int, calls: float) -> dict:
    """Train the sample GPT whose blocks.1.mlp.act is ``TrainingOnlyNaN``; meta.json's first
    forward non-finite, after checking that hooks written here saw it there first."""
    model, loss_of = sample_gpt("pre")
    step_of = [0]
    model.blocks[1].mlp.act = TrainingOnlyNaN(step_of, at, calls)
    found, handles = first_nonfinite_leaf(model, step_of, at)

    def before(step):
        step_of[0] = step

    with Recorder(model, tmp_path / "r", RecorderConfig(**LIGHT)) as rec:
        train(model, loss_of, rec, at + 2, before)
    for h in handles:
        h.remove()
    assert found == ["blocks.1.mlp.act"]
    return stabscope.read_meta(tmp_path / "r")["first_nonfinite"]["forward"]


@pytest.mark.slow
def test_a_nan_made_in_training_mode_only_is_found_by_a_replay_in_that_mode(tmp_path):
    forward = poisoned_forward(tmp_path, at=7, calls=math.inf)  # step 7: not on the schedule
    assert (forward["module"], forward["step"], forward["found_by"]) == (
        "blocks.1.mlp.act",
        7,
        "replay",
    )


@pytest.mark.slow
def test_a_recorded_step_names_the_leaf_a_replay_could_not_find(tmp_path):
    # Step 5 is on the schedule; the NaN comes once, so the flight recorder's replay stays
    # finite and it can only name the block; the recorded step's probes saw the leaf.
    forward = poisoned_forward(tmp_path, at=5, calls=1)
    assert (forward["module"], forward["step"]) == ("blocks.1.mlp.act", 5)
    assert (forward["block"], forward["found_by"]) == ("blocks.1", "recorded step")
    (finding,) = [f for f in checked(tmp_path / "r").findings if f.rule == "nonfinite"]
    assert (finding.module, finding.step) == ("blocks.1.mlp.act", 5)


class NoReplay(torch.nn.Module):
    """GELU that raises when run without autograd at step ``at``: the flight recorder's
    replay (under ``no_grad``) fails there, and it names the leaf by its parameters."""

    def __init__(self, step_of: list[int], at: int) -> None:
        super().__init__()
        self.step_of, self.at = step_of, at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step_of[0] == self.at and not torch.is_grad_enabled():
            raise RuntimeError("no replay here")
        return torch.nn.functional.gelu(x)


@pytest.mark.slow
def test_a_recorded_step_keeps_the_block_of_a_leaf_named_by_its_parameters(tmp_path):
    model, loss_of = sample_gpt("pre")
    step_of = [0]
    model.blocks[1].mlp.act = NoReplay(step_of, 5)

    def before(step):
        step_of[0] = step
        if step == 5:  # on the schedule
            with torch.no_grad():
                model.blocks[1].mlp.fc.weight[0, 0] = math.inf

    with Recorder(model, tmp_path / "r", RecorderConfig(**LIGHT)) as rec:
        train(model, loss_of, rec, 7, before)
    meta = stabscope.read_meta(tmp_path / "r")
    forward = meta["first_nonfinite"]["forward"]
    assert (forward["module"], forward["step"]) == ("blocks.1.mlp.fc", 5)
    assert (forward["block"], forward["found_by"]) == ("blocks.1", "recorded step")
    assert any("replay of blocks.1 failed: RuntimeError" in n for n in meta["notes"])


@pytest.mark.slow
def test_nan_in_one_modules_gradient_is_found_at_that_module_and_step(tmp_path):
    model, loss_of = sample_gpt("pre")
    handle = []

    def inject(module, args, out):  # NaN in the gradient w.r.t. blocks.1.attn.v's output only
        out.register_hook(lambda g: g * math.nan)

    def before(step):
        while handle:
            handle.pop().remove()
        if step == 8:
            handle.append(model.blocks[1].attn.v.register_forward_hook(inject))

    with Recorder(model, tmp_path / "r", RecorderConfig(**LIGHT)) as rec:
        train(model, loss_of, rec, 10, before)
    meta = stabscope.read_meta(tmp_path / "r")
    backward = meta["first_nonfinite"]["backward"]
    assert (backward["module"], backward["step"], backward["found_by"]) == (
        "blocks.1.attn.v",
        8,
        "gradients",
    )
    # Its forward pass was finite: the first non-finite forward is the step after, when the
    # NaN gradient has reached every weight through Adam.
    assert meta["first_nonfinite"]["forward"]["step"] == 9
    df = stabscope.load_run(tmp_path / "r")
    flags = table(df, "flight_grad_nonfinite")
    # The first watched gradient to go bad, backwards: blocks.0's output (= blocks.1's input).
    assert flags[(8, "blocks.0")] == 1 and flags[(8, "blocks.1")] == 0


def test_flight_off_and_its_config_keys(tmp_path):
    model, loss_of = sample_gpt("pre", depth=1)
    cfg = config_from_mapping({"flight": False})
    with Recorder(model, tmp_path / "r", cfg.replace(schedule=SPARSE)) as rec:
        train(model, loss_of, rec, 3)
    metrics = set(stabscope.load_run(tmp_path / "r").metric.astype(str))
    assert "loss" in metrics and not any(m.startswith("flight_") for m in metrics)
    assert config_from_mapping({"flight_every": 7}).flight_every == 7
    with pytest.raises(ConfigError, match="flight_every"):
        config_from_mapping({"flight_every": 0})


def test_a_channel_writes_one_run_value_per_step_with_the_ring(tmp_path):
    # The hook point for other per-step scalars: here the loss again, against the loss rows.
    model, loss_of = sample_gpt("pre", depth=1)
    with Recorder(model, tmp_path / "r", RecorderConfig(**LIGHT, flight_every=3)) as rec:
        opt = torch.optim.SGD(model.parameters(), 1e-2)
        put = None
        for _ in range(8):
            loss = loss_of(model)
            if put is None and "flight" in rec.every:
                put = rec.every["flight"].channel("loss_again")
            if put is not None:
                put(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    df = stabscope.load_run(tmp_path / "r")
    again, loss = table(df, "loss_again"), table(df, "loss")
    assert set(again) == {(s, "__run__") for s in range(1, 8)}
    assert all(again[k] == pytest.approx(loss[k], rel=1e-6) for k in again)


class Checkpointed(torch.nn.Module):
    """A stem and two residual MLP blocks run through ``torch.utils.checkpoint``."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Linear(4, 8)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()) for _ in range(2)
        )
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + torch.utils.checkpoint.checkpoint(block, h, use_reentrant=self.reentrant)
        return h


@pytest.mark.parametrize("reentrant", [True, False])
def test_blocks_under_reentrant_checkpointing_are_named_in_a_note(tmp_path, reentrant):
    model = Checkpointed(reentrant)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    with Recorder(model, tmp_path / "r", RecorderConfig(**LIGHT)) as rec:
        train(model, lambda m: m(x).pow(2).mean(), rec, 3)
    notes = [n for n in stabscope.read_meta(tmp_path / "r")["notes"] if "without autograd" in n]
    flights = table(stabscope.load_run(tmp_path / "r"), "flight_act_rms")
    if reentrant:  # the blocks' training forward runs under no_grad: no every-step rows
        assert len(notes) == 1 and "blocks.0, blocks.1 ran their training forward" in notes[0]
        assert {m for _, m in flights} == {"stem"}
    else:
        assert notes == [] and {m for _, m in flights} == {"stem", "blocks.0", "blocks.1"}
