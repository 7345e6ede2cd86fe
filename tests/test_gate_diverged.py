"""The gate on the run it exists for: a real model that diverges to NaN under plain SGD
(tests/scripts/diverging_sgd.py), profiled and checked by the real CLI in a subprocess.

Where it went non-finite is computed here too, from an uninstrumented twin of the same
training (same seed, model, data and optimizer) with hooks of its own."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from stabscope.drivers.script import load_script
from stabscope.store import load_run
from tests.conftest import ROOT

SCRIPT = ROOT / "tests" / "scripts" / "diverging_sgd.py"
STEPS = 30


def stabscope(cwd, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "stabscope", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def twin() -> tuple[list[float], tuple[int, str] | None, tuple[int, str] | None]:
    """The losses; the first step with a non-finite module output and the first such module in
    forward (call) order; the first step with a non-finite gradient with respect to a module
    output and the first such module in backward order. Every step counts: the flight
    recorder watches them all."""
    script = load_script(SCRIPT, {})
    torch.manual_seed(0)  # what profile's seed 0 does before building the model
    model = script.model(script.config)
    opt = script.optimizer(model, script.config)
    batch = next(iter(script.batches(script.config)))
    names = {m: name or "<root>" for name, m in model.named_modules()}
    step_out: list[str] = []  # modules with a non-finite output, in call order
    step_grad: list[str] = []  # modules with a non-finite output gradient, in backward order

    def on_forward(module: nn.Module, args, out: torch.Tensor) -> None:
        if not torch.isfinite(out).all():
            step_out.append(names[module])
        name = names[module]
        out.register_hook(lambda g: None if torch.isfinite(g).all() else step_grad.append(name))

    for m in model.modules():
        m.register_forward_hook(on_forward)
    losses, forward, backward = [], None, None
    for step in range(STEPS):
        step_out.clear(), step_grad.clear()
        opt.zero_grad()
        loss = script.loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step_out and forward is None:
            forward = (step, step_out[0])
        if step_grad and backward is None:
            backward = (step, step_grad[0])
    return losses, forward, backward


@pytest.mark.slow
def test_check_a_diverging_script_then_its_run(tmp_path):
    res = stabscope(tmp_path, "check", SCRIPT, "--steps", STEPS)
    assert res.returncode == 1, res.stderr
    assert "error nonfinite" in res.stderr
    assert "Traceback" not in res.stderr and "Warning" not in res.stderr
    run = tmp_path / "runs" / "diverging_sgd-check"

    res = stabscope(tmp_path, "check", run, "--format", "json")
    assert res.returncode == 1, res.stderr

    def reject(constant):
        raise ValueError(f"not strict JSON: {constant}")

    doc = json.loads(res.stdout, parse_constant=reject)
    assert doc["failed"] is True and doc["rule_errors"] == {}
    (f,) = [f for f in doc["findings"] if f["rule"] == "nonfinite"]
    assert f["severity"] == "error"

    losses, forward, backward = twin()
    # The recorded losses are the twin's: same training, and it does diverge partway.
    recorded = load_run(run, metrics=["loss"]).sort_values("step").value.to_numpy(float)
    finite = [math.isfinite(v) for v in losses]
    assert [math.isfinite(v) for v in recorded] == finite and 5 < finite.index(False) < 25
    assert recorded[finite] == pytest.approx([v for v in losses if math.isfinite(v)], rel=1e-5)
    first_loss = finite.index(False)
    assert f"the loss went non-finite at step {first_loss} ({losses[first_loss]})" in f["message"]
    # The first module, and its step: forward leads unless backward went first.
    assert forward is not None and backward is not None
    # (act_nonfinite at a recorded step, the flight recorder's block metric between them)
    if forward[0] <= backward[0]:
        assert f["metric"] in ("act_nonfinite", "flight_act_nonfinite")
        assert (f["step"], f["module"]) == forward
    else:
        assert f["metric"] in ("grad_nonfinite", "flight_grad_nonfinite")
        assert (f["step"], f["module"]) == backward

    res = stabscope(tmp_path, "summary", run)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert "Warning" not in res.stderr  # numpy's, on an all-NaN last tenth of the loss
    assert "first non-finite (forward)" in res.stderr
    res = stabscope(tmp_path, "report", run, "-o", tmp_path / "report.html")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert "nonfinite" in (tmp_path / "report.html").read_text(encoding="utf-8")
