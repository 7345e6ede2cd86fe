"""fp16 autocast with a ``GradScaler`` whose first scale is too large: the scaled gradients
overflow, the scaler skips ``optimizer.step()`` and halves its scale until they fit, and the
model stays finite. Those steps are how dynamic loss scaling works, not a failure: ``check``
warns and passes. The same Inf gradients with the steps taken (no scaler) stay an error."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stabscope import Recorder, read_meta
from stabscope.errors import StabscopeWarning
from stabscope.rules import check_run

STEPS = 24


def train(out, scaled: bool, on_error: str = "warn") -> list[int]:
    """The steps the optimizer skipped (the first weight did not move), by the script's own
    account."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**27, growth_interval=1000)
    skipped = []
    with Recorder(model, out, on_error=on_error) as rec:
        for step in range(STEPS):
            x = torch.randn(32, 8)
            y = (x[:, 0] > 0).long()
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x).float(), y)
            before = model[0].weight.detach().clone()
            if scaled:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:  # the same overflow, stepped anyway: the weights go non-finite
                (loss * 2.0**27).backward()
                opt.step()
            if torch.equal(before, model[0].weight):
                skipped.append(step)
            rec.step(loss=loss)
    return skipped


def test_steps_a_loss_scaler_skipped_are_a_warning_not_a_failure(tmp_path) -> None:
    # Online too: stopping on errors, the run is not stopped by the scaler's first steps.
    with warnings.catch_warnings():
        warnings.simplefilter("error", StabscopeWarning)  # no online error verdict either
        skipped = train(tmp_path / "run", scaled=True, on_error="stop")
    assert read_meta(tmp_path / "run")["status"] == "complete"
    assert skipped[:3] == [0, 1, 2] and len(skipped) < STEPS - 5
    result = check_run(tmp_path / "run")
    (found,) = [f for f in result.findings if f.rule == "nonfinite"]
    # The steps it names are the scaler's first run of skips, by the script's own account
    # (a skip can also come from a parameter's gradient alone, which no module output
    # gradient shows: they are counted from the steps the optimizer did not take).
    named = [int(s) for s in found.message.split("(")[1].split(")")[0].split(", ")]
    first_run = [s for k, s in enumerate(skipped) if s == k]  # 0, 1, 2, ... unbroken
    assert found.severity == "warning" and found.step == skipped[0]
    assert named == first_run and found.value == len(named)
    assert not [f for f in result.findings if f.severity == "error"]


def test_the_same_overflow_stepped_anyway_is_an_error(tmp_path) -> None:
    with pytest.warns(StabscopeWarning, match="nonfinite"):  # the online verdict, at once
        train(tmp_path / "run", scaled=False)
    (found,) = [f for f in check_run(tmp_path / "run").findings if f.rule == "nonfinite"]
    assert found.severity == "error"
