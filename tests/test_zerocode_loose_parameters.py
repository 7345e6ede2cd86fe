"""Training scripts whose optimizer steps tensors no module holds: raw tensors, and a model's
parameters stacked for ``torch.func.vmap``. They are recorded from the second step as
``LooseParameters``: the loss, the gradient norm and each tensor's update, each against the
script's own numbers; a diverging one fails the gate."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

import stabscope
from tests.test_cli import invoke

RAW = """
import json, sys
import torch
import torch.nn.functional as F

g = torch.Generator().manual_seed(0)
W = (0.1 * torch.randn(6, 3, generator=g)).requires_grad_()
b = torch.zeros(3, requires_grad=True)
opt = torch.optim.SGD([W, b], lr=float(sys.argv[1]))
x = torch.randn(64, 6, generator=g)
y = x[:, :3].argmax(1)
log = []
for step in range(30):
    loss = F.cross_entropy(x @ W + b, y)
    opt.zero_grad()
    loss.backward()
    norm = torch.cat([W.grad.reshape(-1), b.grad]).norm()
    before = W.detach().clone()
    opt.step()
    log.append({"loss": loss.item(), "grad_norm": norm.item(), "dW": (W - before).norm().item()})
json.dump(log, open(sys.argv[2], "w"))
"""

STACKED = """
import copy, json, sys
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state

torch.manual_seed(0)
def make():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


models = [make() for _ in range(3)]
params, buffers = stack_module_state(models)
base = copy.deepcopy(models[0]).to("meta")
opt = torch.optim.Adam(list(params.values()), lr=1e-2)
g = torch.Generator().manual_seed(1)
log = []
for step in range(12):
    x = torch.randn(16, 4, generator=g)
    ensemble = torch.vmap(lambda p, b, x: functional_call(base, (p, b), (x,)), (0, 0, None))
    out = ensemble(params, buffers, x)
    loss = F.mse_loss(out, x[:, :1].sin().expand(3, 16, 1))
    opt.zero_grad()
    loss.backward()
    norm = torch.cat([p.grad.reshape(-1) for p in params.values()]).norm()
    opt.step()
    log.append({"loss": loss.item(), "grad_norm": norm.item()})
json.dump(log, open(sys.argv[1], "w"))
"""


def _series(run, metric: str, module: str = "__run__") -> dict[int, float]:
    df = stabscope.load_run(run, metrics=[metric])
    df = df[df.module == module]
    return dict(zip(df.step.astype(int), df.value.astype(float)))


def _profiled(tmp_path, source: str, *args: str) -> tuple[Path, list]:
    """``source`` written as a script, profiled zero-code with ``args`` and the path of the
    log it writes last; the run directory and the script's log."""
    script, log_path, out = tmp_path / "script.py", tmp_path / "log.json", tmp_path / "run"
    script.write_text(textwrap.dedent(source))
    res = invoke("profile", script, "--out", out, "-q", "--", *args, log_path)
    assert res.exit_code == 0, res.output
    return out, json.loads(log_path.read_text())


def test_raw_tensors_are_recorded_from_the_second_step_as_the_script_computes_them(tmp_path):
    out, log = _profiled(tmp_path, RAW, "0.5")
    meta = stabscope.read_meta(out)
    assert meta["status"] == "complete" and meta["model_type"] == "LooseParameters"
    assert [p["name"] for p in meta["parameters"]] == ["group0_0", "group0_1"]
    assert any("belong to no module" in n for n in meta["notes"])
    loss = _series(out, "loss")
    assert sorted(loss) == list(range(1, 30))  # found at the first step's end
    assert [loss[s] for s in range(1, 30)] == pytest.approx([r["loss"] for r in log[1:]], rel=1e-6)
    grad_norm = _series(out, "grad_norm")
    assert [grad_norm[s] for s in range(1, 30)] == pytest.approx(
        [r["grad_norm"] for r in log[1:]], rel=1e-5
    )
    update = _series(out, "update_norm", "group0_0")
    assert update and all(update[s] == pytest.approx(log[s]["dW"], rel=1e-5) for s in update)
    assert invoke("check", out).exit_code == 0


REGRESSION = """
import torch

g = torch.Generator().manual_seed(0)
w = torch.zeros(6, requires_grad=True)
x = torch.randn(64, 6, generator=g)
y = x @ torch.randn(6, generator=g)
opt = torch.optim.SGD([w], lr=1.5)  # above 2 / the largest eigenvalue of 2 x'x / 64
for step in range(40):
    loss = (x @ w - y).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
"""


def test_raw_tensors_that_diverge_fail_the_gate(tmp_path):
    script, out = tmp_path / "regression.py", tmp_path / "run"
    script.write_text(textwrap.dedent(REGRESSION))
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    top = float(torch.linalg.eigvalsh(2 * x.T @ x / 64).max())
    assert 2 / top < 1.5  # the reference: gradient descent on this quadratic diverges
    res = invoke("profile", script, "--out", out, "-q")
    assert res.exit_code == 0, res.output
    loss = _series(out, "loss")
    assert loss[39] > 1e3 * loss[1] or loss[39] != loss[39]
    res = invoke("check", out, "--format", "json")
    assert res.exit_code == 1
    errors = {f["rule"] for f in json.loads(res.stdout)["findings"] if f["severity"] == "error"}
    assert errors == {"loss-divergence", "nonfinite"}


def test_parameters_stacked_for_vmap_are_recorded(tmp_path):
    out, log = _profiled(tmp_path, STACKED)
    loss = _series(out, "loss")
    assert [loss[s] for s in range(1, 12)] == pytest.approx([r["loss"] for r in log[1:]], rel=1e-6)
    grad_norm = _series(out, "grad_norm")
    assert [grad_norm[s] for s in range(1, 12)] == pytest.approx(
        [r["grad_norm"] for r in log[1:]], rel=1e-5
    )
    shapes = [p["shape"] for p in stabscope.read_meta(out)["parameters"]]
    assert shapes == [[3, 8, 4], [3, 8], [3, 1, 8], [3, 1]]  # the stacked tensors themselves


GRAD_ONLY = """
import json, sys
import torch

g = torch.Generator().manual_seed(0)
w = torch.zeros(6, requires_grad=True)
x = torch.randn(64, 6, generator=g)
y = x @ torch.randn(6, generator=g)
opt = torch.optim.SGD([w], lr=0.1)
log = []
for step in range(12):
    loss = (x @ w - y).pow(2).mean()
    (w.grad,) = torch.autograd.grad(loss, [w])
    opt.step()
    log.append(loss.item())
json.dump(log, open(sys.argv[1], "w"))
"""


def test_raw_tensors_whose_gradient_is_taken_with_autograd_grad_are_recorded(tmp_path):
    out, log = _profiled(tmp_path, GRAD_ONLY)
    loss = _series(out, "loss")
    assert [loss[s] for s in range(1, 12)] == pytest.approx(log[1:], rel=1e-6)
