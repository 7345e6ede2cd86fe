"""stabscope's own error inside a training script never ends the script: the recording stops
at that step, what was recorded stays, and the gate reads the run as incomplete.

The fault is injected into stabscope's own code (a step boundary that raises at step 3, a
model search that raises); torch and the script are untouched. The reference is the script's
own losses, computed again here without stabscope: with the fault they are the same, every
step, to the last bit."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from stabscope.drivers.zerocode import attach as zerocode_attach
from stabscope.drivers.zerocode import losses as zerocode_losses
from stabscope.drivers.zerocode import profile_training_script
from stabscope.record import recorder as recorder_module
from stabscope.record.config import RecorderConfig
from stabscope.rules import check_run
from stabscope.store import load_run
from stabscope.store.run_meta import load_meta
from tests.test_cli import invoke

STEPS = 10
SCRIPT = """
import json, sys
import torch

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
x, y = torch.randn(32, 6), torch.randn(32, 1)
losses = []
for step in range(10):
    loss = (model(x) - y).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
json.dump(losses, open(sys.argv[1], "w"))
"""


def reference_losses() -> list[float]:
    """The script's loop, run here without stabscope."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    out = []
    for _ in range(STEPS):
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


def profile(tmp_path, capsys) -> tuple[object, list[float], str]:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    out, log = tmp_path / "run", tmp_path / "losses.json"
    profile_training_script(script, [str(log)], out, RecorderConfig(online_rules=False))
    return out, json.loads(log.read_text()), capsys.readouterr().err


def test_a_fault_at_a_step_boundary_stops_the_recording_not_the_script(
    tmp_path, capsys, monkeypatch
):
    every_boundary = recorder_module.Recorder._every_boundary

    def faulty(self, step: int) -> None:
        if step == 3:
            # A message as long as torch's dispatcher errors: its first line, then 5,000
            # lines of dispatch keys.
            raise RuntimeError("injected fault\n" + "Key: registered at x.cpp:1\n" * 5000)
        every_boundary(self, step)

    monkeypatch.setattr(recorder_module.Recorder, "_every_boundary", faulty)
    out, own, stderr = profile(tmp_path, capsys)
    assert own == reference_losses()  # the script trained to its end, bit for bit
    meta = load_meta(out)
    fault = meta.tool_error
    assert fault is not None
    assert (fault["where"], fault["step"], fault["type"]) == ("a step boundary", 3, "RuntimeError")
    assert fault["message"] == "injected fault" and "faulty" in fault["traceback"]
    # The frames that say where it raised are kept, not the message's tail.
    assert fault["traceback"].endswith("RuntimeError: injected fault\n")
    assert "Key: registered" not in stderr  # the source line above is in the traceback
    assert fault["traceback"].count("registered at x.cpp") <= 1
    assert "script_ended" not in meta.doc["run"]  # its last steps are not recorded
    assert stderr.count("stabscope's own error in a step boundary at step 3") == 1
    # What was recorded before the fault is kept, and equals the script's own losses.
    rows = load_run(out, modules=["__run__"], metrics=["loss"]).sort_values("step")
    recorded = dict(zip(rows.step.astype(int), rows.value.astype(float)))
    assert {0, 1, 2} <= set(recorded) and max(recorded) <= 3
    # Step 3's rows were flushed before its boundary raised: it trained, and counts so.
    assert meta.recorded_steps == len(recorded) <= meta.steps == max(recorded) + 1
    for step, value in recorded.items():
        assert value == pytest.approx(own[step], rel=1e-6)
    # The gate reads it as incomplete: an error, a warning under --allow-incomplete.
    (status,) = [f for f in check_run(out).findings if f.rule == "run-status"]
    assert status.severity == "error" and "stabscope's own error" in status.message
    assert invoke("check", out, "-q").exit_code == 1
    res = invoke("check", out, "--allow-incomplete", "--format", "json")
    found = {f["rule"]: f for f in json.loads(res.stdout)["findings"]}
    assert found["run-status"]["severity"] == "warning"


def test_a_fault_while_finding_the_model_leaves_a_run_that_says_so(tmp_path, capsys, monkeypatch):
    def faulty(self, *args, **kwargs) -> None:
        raise KeyError("injected while finding the model")

    monkeypatch.setattr(zerocode_attach.ScriptRecording, "_find_model", faulty)
    out, own, stderr = profile(tmp_path, capsys)
    assert own == reference_losses()
    fault = load_meta(out).tool_error
    assert fault is not None and (fault["where"], fault["step"]) == ("finding the model", 0)
    assert "stabscope's own error in finding the model" in stderr
    (status,) = [f for f in check_run(out).findings if f.rule == "run-status"]
    assert status.severity == "error" and "KeyError" in status.message


def test_a_fault_while_reading_the_loss_leaves_the_scripts_backward_alone(
    tmp_path, capsys, monkeypatch
):
    """Zero-code mode reads each step's loss inside the script's own ``loss.backward()``,
    before the pass: a fault there at the fourth backward stops the recording; the pass
    runs, and the script's losses are those of the run without stabscope, bit for bit."""
    see_backward = zerocode_losses.LossTap.see_backward
    seen = {"n": 0}

    def faulty(self, tensors, grad_tensors) -> None:
        seen["n"] += 1
        if seen["n"] == 4:
            raise IndexError("injected while reading the loss")
        see_backward(self, tensors, grad_tensors)

    monkeypatch.setattr(zerocode_losses.LossTap, "see_backward", faulty)
    out, own, stderr = profile(tmp_path, capsys)
    assert own == reference_losses() and seen["n"] == 4  # not called again after the fault
    fault = load_meta(out).tool_error
    assert fault is not None and fault["where"] == "reading the loss in backward()"
    assert fault["type"] == "IndexError" and fault["step"] == 3
    assert stderr.count("stabscope's own error in reading the loss") == 1
    rows = load_run(out, modules=["__run__"], metrics=["loss"]).sort_values("step")
    assert list(rows.step.astype(int)) == [0, 1, 2]  # the losses read before it, kept
    assert list(rows.value) == pytest.approx(own[:3], rel=1e-6)
    (status,) = [f for f in check_run(out).findings if f.rule == "run-status"]
    assert status.severity == "error" and "IndexError" in status.message


@pytest.mark.parametrize(
    ("target", "where"),
    [
        ("stabscope.record.recorder.Recorder._on_forward", "a module's forward hook"),
        ("stabscope.probes.flight_ring.FlightRing.put", "the flight recorder's forward hook"),
    ],
)
def test_a_fault_in_a_hook_never_reaches_the_users_loop(
    tmp_path, capsys, monkeypatch, target, where
):
    """Library mode: the fault is raised inside a hook of stabscope's that runs in the user's
    own ``model(x)``. The loop, ``rec.step(loss)`` included, runs to its end unchanged."""
    import importlib

    from stabscope import Recorder, Schedule

    module_name, cls_name, method = target.rsplit(".", 2)
    cls = getattr(importlib.import_module(module_name), cls_name)
    original = getattr(cls, method)
    calls = {"n": 0}

    def faulty(self, *args, **kwargs):
        calls["n"] += 1
        if rec.step_index == 2:
            raise ValueError("injected in a hook")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, faulty)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    own = []
    config = RecorderConfig(schedule=Schedule(STEPS, 0), online_rules=False)
    with Recorder(model, tmp_path / "run", config) as rec:
        for _ in range(STEPS):
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss)
            own.append(loss.item())
    assert own == reference_losses() and calls["n"] > 0
    fault = load_meta(tmp_path / "run").tool_error
    assert fault is not None and (fault["where"], fault["step"]) == (where, 2)
    assert capsys.readouterr().err.count("stabscope's own error") == 1
    steps = load_run(tmp_path / "run", metrics=["loss"]).step.astype(int)
    assert set(steps) <= {0, 1, 2} and {0, 1} <= set(steps)


def test_a_fault_inside_the_recorders_start_leaves_no_handler_behind(tmp_path, capsys, monkeypatch):
    """The Recorder found for the script faults while starting: the run is closed at the
    next safe point, so its signal handlers are the process's own again and meta.json says
    complete with the fault, not failed at exit."""
    import signal

    def faulty(self) -> bool:
        raise RuntimeError("injected in start")

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(recorder_module.Recorder, "_plan_lr", faulty)
    out, own, _ = profile(tmp_path, capsys)
    assert own == reference_losses()
    meta = load_meta(out)
    assert meta.doc["status"] == "complete" and meta.tool_error["where"] == "finding the model"
    assert signal.getsignal(signal.SIGINT) is before


def test_the_users_on_finding_may_still_raise_to_stop_the_training(tmp_path):
    """The callback is the user's code: its exception reaches the user's loop, as without
    the guard, and is no fault of stabscope's."""
    from stabscope import Recorder, Schedule

    def stop_now(finding) -> None:
        raise RuntimeError(f"stop now: {finding.rule}")

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    config = RecorderConfig(schedule=Schedule(STEPS, 0))
    recording = Recorder(model, tmp_path / "run", config, on_finding=stop_now)
    with pytest.raises(RuntimeError, match="stop now: nonfinite"), recording as rec:
        for step in range(STEPS):
            inputs = x.clone()
            if step == 2:
                inputs[0, 0] = float("inf")  # the first non-finite: judged at once
            loss = (model(inputs) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss)
    assert load_meta(tmp_path / "run").tool_error is None
