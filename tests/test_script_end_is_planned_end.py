"""A training script that runs to its own end has reached the end of its training: the rules
that judge how a run ended (``no-better-than-constant``, ``constant-prediction``, ...) read
it there, with no ``--budget`` given. A recording that ``--max-steps`` ended while the script
went on has not: those rules wait for a planned end that is not known.

The reference is the script's own losses against the entropy of its labels, computed here:
labels drawn independently of the inputs leave a classifier at that entropy, and labels that
are a function of the inputs let it fall far below."""

from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import pytest

from stabscope.drivers.zerocode import profile_training_script
from stabscope.record.config import RecorderConfig
from stabscope.report.findings import evidence
from stabscope.rules import check_run
from stabscope.store.run_meta import load_meta

SCRIPT = """
import json, sys
import torch
import torch.nn.functional as F

torch.manual_seed(0)
shuffled = sys.argv[1] == "shuffled"
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
losses, labels = [], []
for step in range(150):
    x = torch.randn(64, 8)
    y = torch.randint(0, 4, (64,)) if shuffled else x[:, :4].argmax(1)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
    labels += y.tolist()
json.dump({"losses": losses, "labels": labels}, open(sys.argv[2], "w"))
"""
END_RULES = {"no-better-than-constant", "constant-prediction", "loss-above-constant"}


def run(tmp_path, kind: str, **kwargs) -> tuple[set[str], dict, object]:
    script = tmp_path / "clf.py"
    script.write_text(textwrap.dedent(SCRIPT))
    out, losses = tmp_path / f"run-{kind}", tmp_path / f"{kind}.json"
    config = RecorderConfig(online_rules=False)
    profile_training_script(script, [kind, str(losses)], out, config, **kwargs)
    errors = {f.rule for f in check_run(out).findings if f.severity == "error"}
    return errors, json.loads(losses.read_text()), load_meta(out)


def label_entropy(labels: list[int]) -> float:
    p = np.bincount(labels) / len(labels)
    return float(-(p[p > 0] * np.log(p[p > 0])).sum())


@pytest.mark.slow
def test_a_script_that_ended_on_its_own_is_judged_at_its_end(tmp_path):
    errors, own, meta = run(tmp_path, "shuffled")
    # The reference: the script's last losses sit at its labels' entropy (about ln 4).
    end = float(np.mean(own["losses"][-15:]))
    assert abs(end - label_entropy(own["labels"])) < 0.05 and label_entropy(own["labels"]) > 1.38
    assert meta.doc["run"]["script_ended"] is True and meta.budget is None
    assert meta.planned_end == meta.steps == 150
    assert errors & END_RULES, errors

    errors, own, meta = run(tmp_path, "learnable")
    assert float(np.mean(own["losses"][-15:])) < 0.5 * math.log(4)
    assert meta.planned_end == 150 and not errors & END_RULES, errors


def test_a_recording_ended_by_max_steps_waits_for_a_planned_end(tmp_path):
    errors, own, meta = run(tmp_path, "shuffled", max_steps=120)
    assert len(own["losses"]) == 150 and meta.steps == 120  # the script went on unrecorded
    assert "script_ended" not in meta.doc["run"] and meta.planned_end is None
    assert not errors & END_RULES, errors


def test_the_forecast_of_a_script_that_ended_speaks_of_its_end(tmp_path):
    """At the last step of a script that ran to its end, "fails by the end of training" is no
    forecast: the end is known (the steps seen) and the rules on the outcome judge it."""
    script = tmp_path / "clf.py"
    script.write_text(textwrap.dedent(SCRIPT))
    out = tmp_path / "run"
    profile_training_script(
        script, ["learnable", str(tmp_path / "l.json")], out, RecorderConfig(online_rules=False)
    )
    (forecast,) = [f for f in check_run(out).findings if f.rule == "failure-forecast"]
    assert load_meta(out).planned_end == 150
    assert forecast.severity == "info", forecast
    assert "reached the planned end (step 150)" in forecast.message, forecast.message
    assert "no longer applies" in forecast.message
    assert forecast.remedy.startswith("none")  # a low score asks nothing of the user
    # The run as a whole is no module to the reader; the JSON keeps "__run__".
    assert forecast.module == "__run__" and "__run__" not in evidence(forecast)
    assert evidence(forecast).endswith("from failure_probability at step 149")
