"""``nonfinite`` where the loss function itself made the first non-finite value: a CTC loss
whose target cannot be aligned to its input (longer than the frames) is infinite from finite
log-probabilities, and its gradient carries the Inf back. The finding names the loss, not the
head whose output gradient met it first, and the remedy is CTC's. The reference is the
forward's outputs, checked finite in the loop."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from stabscope import Recorder, RecorderConfig, Schedule
from stabscope.rules import check_run

STEPS, BAD = 3, 2  # the last step: a target longer than its input


def test_an_infinite_ctc_loss_is_the_losss_own(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    config = RecorderConfig(schedule=Schedule(STEPS, 0), online_rules=False)
    with Recorder(model, tmp_path / "run", config) as rec:
        for step in range(STEPS):
            log_probs = F.log_softmax(model(torch.randn(10, 4, 8)), dim=-1)  # (T, N, C)
            assert torch.isfinite(log_probs).all()
            target_lengths = torch.full((4,), 12 if step == BAD else 3)  # 12 labels, 10 frames
            targets = torch.randint(1, 5, (4, 12))
            loss = F.ctc_loss(log_probs, targets, torch.full((4,), 10), target_lengths)
            assert math.isinf(loss.item()) == (step == BAD)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss)
    (f,) = [f for f in check_run(tmp_path / "run").findings if f.rule == "nonfinite"]
    assert f.step == BAD
    assert f.message.startswith(f"NaN/Inf from step {BAD}, first in the loss (inf), from finite")
    assert "zero_infinity=True" in f.remedy and "float32" not in f.remedy
