"""``nonfinite`` where an optimizer step wrote non-finite weights: a float16 model under Adam,
whose eps (1e-8) rounds to 0 in float16, so that a second moment that underflowed divides by
0. The first non-finite output is then only the first module to meet those weights, and the
finding says the weights were non-finite before the forward and which update wrote them. The
reference is the weights themselves, checked before each step; a run whose weights stay finite
while an input goes non-finite is not told so."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stabscope import Recorder, RecorderConfig, Schedule
from stabscope.rules import check_run
from stabscope.store.run_meta import load_meta

STEPS = 4


def train(
    run_dir,
    half: bool,
    bad_input_at: int | None = None,
    bad: float = float("inf"),
    gain: float = 1.0,
) -> list[list[bool]]:
    """Per step, which parameters were finite when the step began."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight.mul_(gain)
    model = model.half() if half else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    finite = []
    config = RecorderConfig(schedule=Schedule(STEPS, 0), online_rules=False)
    with Recorder(model, run_dir, config) as rec:
        for step in range(STEPS):
            finite.append([bool(torch.isfinite(p).all()) for p in model.parameters()])
            inputs = x.clone()
            if step == bad_input_at:
                inputs[0, :] = bad
            loss = F.cross_entropy(model(inputs.to(model[0].weight.dtype)).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss)
    return finite


def nonfinite(run_dir):
    (f,) = [f for f in check_run(run_dir).findings if f.rule == "nonfinite"]
    return f


def test_weights_an_update_wrote_non_finite_are_named_as_such(tmp_path):
    finite = train(tmp_path / "half", half=True)
    assert all(finite[0]) and not all(finite[1])  # step 0's update wrote them
    bad = finite[1].count(False)
    f = nonfinite(tmp_path / "half")
    assert f.step == 1
    assert f"norms were non-finite before step 1's forward ({bad} of 4 parameters" in f.message
    assert "the optimizer step of step 0, from finite weights, wrote them" in f.message
    assert "float16" in f.remedy and "eps" in f.remedy


def test_a_non_finite_input_with_finite_weights_is_not_told_so(tmp_path):
    finite = train(tmp_path / "input", half=False, bad_input_at=2)
    assert all(finite[2])  # the weights were finite when the Inf came in
    f = nonfinite(tmp_path / "input")
    assert f.step == 2 and "norms were non-finite" not in f.message
    assert "float16" not in f.remedy
    # The module computes in float32 already (meta.json's module table): no "compute it in
    # float32", which an all-float32 run cannot act on.
    assert "computes in float32 already" in f.remedy
    assert "compute that module in float32" not in f.remedy


def test_an_overflow_of_a_float16_output_is_told_to_compute_in_float32(tmp_path):
    # 6e4 is finite in float16 (its largest is 65504); 8 of them through the first Linear,
    # its weights 4x their init, overflow it, with the weights finite at step 0.
    finite = train(tmp_path / "half_input", half=True, bad_input_at=0, bad=6e4, gain=4.0)
    assert all(finite[0])
    with torch.no_grad():
        torch.manual_seed(0)
        first = torch.nn.Linear(8, 16)
        first.weight.mul_(4.0)
        assert not torch.isfinite(first.half()(torch.full((1, 8), 6e4).half())).all()
    f = nonfinite(tmp_path / "half_input")
    assert f.step == 0 and f.module == "0"
    dtypes = {m["name"]: m.get("output_dtype") for m in load_meta(tmp_path / "half_input").modules}
    assert dtypes["0"] == "float16"
    assert "compute that module in float32" in f.remedy
