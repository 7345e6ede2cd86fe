"""Rule ``squashed-logits`` on real training: a classifier whose last layer is a softmax,
trained with ``cross_entropy`` (which applies its own), and a decoder whose sigmoid output goes
into ``binary_cross_entropy_with_logits`` beside a KL term, are errors from the first step; the
same models handing the loss their raw scores are not.

The references are analytic: over V classes with inputs in [0, 1] a cross-entropy is at least
ln(1 + (V - 1) / e), and a binary cross-entropy at least ln(1 + 1/e) per element; each run's
own losses are checked to stay above that floor while the fixed twin falls below it."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stabscope import Recorder, RecorderConfig, Schedule
from stabscope.drivers.zerocode import profile_training_script
from stabscope.record.squashed_logits import squashed_logits
from stabscope.rules import check_run
from stabscope.rules.training_loop import squashed_floors

CLASSIFIER = """
import json, sys
import torch
from torch import nn

torch.manual_seed(0)
squashed = sys.argv[1] == "softmax"
layers = [nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 10)]
model = nn.Sequential(*layers, *([nn.Softmax(dim=-1)] if squashed else []))
teacher = torch.randn(8, 10)
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
losses = []
for step in range(120):
    x = torch.randn(64, 8)
    loss = nn.CrossEntropyLoss()(model(x), (x @ teacher).argmax(1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
json.dump(losses, open(sys.argv[2], "w"))
"""


def squashed_findings(run_dir) -> list:
    return [f for f in check_run(run_dir).findings if f.rule == "squashed-logits"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["softmax", "raw"])
def test_a_softmax_before_cross_entropy_is_an_error(tmp_path, kind):
    import json

    script = tmp_path / "clf.py"
    script.write_text(textwrap.dedent(CLASSIFIER))
    out, log = tmp_path / "run", tmp_path / "losses.json"
    profile_training_script(script, [kind, str(log)], out, RecorderConfig(online_rules=False))
    losses = json.loads(log.read_text())
    floor = math.log1p(9 / math.e)  # 10 classes, inputs in [0, 1]: 1.46
    found = squashed_findings(out)
    if kind == "softmax":
        assert min(losses) >= floor - 1e-6  # the bound holds on the run's own losses
        (f,) = found
        assert f.severity == "error" and f.step == 0  # 1.46 is over half of ln 10
        assert f.value == pytest.approx(floor / math.log(10), rel=1e-9)
        assert "softmax" in f.message and f"below {floor:.3g} over 10 classes" in f.message
    else:
        assert min(losses) < 0.5 * floor  # the raw scores learn past the squashed floor
        assert found == []


def vae_step(decoder: nn.Module, x: torch.Tensor, squashed: bool) -> torch.Tensor:
    """A reconstruction (sum over pixels, mean over the batch) plus a KL-like term."""
    out = decoder(x)
    recon = torch.sigmoid(out) if squashed else out
    bce = F.binary_cross_entropy_with_logits(recon, x, reduction="sum") / len(x)
    return bce + 1e-3 * out.pow(2).mean()


@pytest.mark.parametrize("squashed", [True, False])
def test_a_sigmoid_before_bce_with_logits_in_a_summed_loss_is_an_error(tmp_path, squashed):
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16))
    opt = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    x = (torch.rand(64, 16) > 0.5).float()  # binary pixels: a perfect fit scores 0
    config = RecorderConfig(schedule=Schedule(5, 0), online_rules=False)
    per_element = []
    with Recorder(decoder, tmp_path / "run", config) as rec:
        for _ in range(40):
            loss = vae_step(decoder, x, squashed)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss)
            per_element.append(loss.item() / x.shape[1])
    found = squashed_findings(tmp_path / "run")
    floor = math.log1p(1 / math.e)  # a positive pixel at best sigmoid(1): 0.313
    if squashed:
        assert min(per_element) >= floor
        (f,) = found
        # A target of 0 can do no better than sigmoid(0) = 1/2: a coin flip, ln 2.
        assert f.severity == "error" and f.value == pytest.approx(1.0)
        assert "binary_cross_entropy_with_logits" in f.message and "sigmoid" in f.message
        assert f"at least ln(1 + e^-1) = {floor:.3g}" in f.message
    else:
        assert min(per_element) < floor
        assert found == []


def test_what_is_meant_is_not_read_as_squashed():
    torch.manual_seed(0)
    x = torch.randn(8, 5, requires_grad=True)
    y = torch.randint(0, 5, (8,))
    soft = torch.softmax(torch.randn(8, 5, requires_grad=True), -1)  # a trained teacher's
    meant = [
        F.cross_entropy(x, y),
        F.cross_entropy(F.log_softmax(x, -1), y),  # a log-softmax of log-probabilities
        F.nll_loss(F.log_softmax(x, -1), y),
        F.binary_cross_entropy(torch.sigmoid(x), torch.rand(8, 5)),
        F.cross_entropy(x, soft),  # soft labels from a softmax: a target, not the input
        -(soft * F.log_softmax(x, -1)).sum(-1).mean(),
        F.cross_entropy(2.0 * torch.softmax(x, -1), y),  # rescaled: not read as squashed
    ]
    assert [squashed_logits(loss) for loss in meant] == [None] * len(meant)
    read = squashed_logits(F.nll_loss(torch.softmax(x, -1), y))
    assert read is not None and read["function"] == "nll_loss" and read["floor"] is None
    # Past shape-only nodes: a (B, T, V) softmax permuted to (B, V, T) for the loss.
    seq = torch.softmax(x.view(2, 4, 5), -1).permute(0, 2, 1)
    read = squashed_logits(F.cross_entropy(seq, y.view(2, 4)))
    assert read is not None and read["classes"] == 5
    assert read["floor"] == pytest.approx(math.log1p(4 / math.e))


def test_a_decoders_softmax_per_step_stacked_for_the_loss_is_read():
    """A decoder that makes its (B, V) output one step at a time and stacks the T steps into
    (B, T, V): the softmax of each step is past the stack (and a reshape), as one softmax
    over the whole would be. Steps that mix a softmax with raw scores are not read."""
    torch.manual_seed(0)
    B, T, V = 3, 4, 6
    steps = [torch.randn(B, V, requires_grad=True) for _ in range(T)]
    y = torch.randint(0, V, (B * T,))

    def loss(outputs: list[torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(torch.stack(outputs, 1).reshape(-1, V), y)

    read = squashed_logits(loss([torch.softmax(s, -1) for s in steps]))
    assert read is not None and (read["activation"], read["classes"]) == ("softmax", V)
    assert read["floor"] == pytest.approx(math.log1p((V - 1) / math.e))
    cat = torch.cat([torch.sigmoid(s) for s in steps]).reshape(-1, V)  # (T*B, V)
    read = squashed_logits(F.binary_cross_entropy_with_logits(cat, torch.rand(T * B, V)))
    assert read is not None and read["activation"] == "sigmoid"
    mixed = [torch.softmax(s, -1) for s in steps[:-1]] + [steps[-1]]
    assert squashed_logits(loss(mixed)) is None
    assert squashed_logits(loss(steps)) is None


def test_how_severe_depends_on_what_the_floor_leaves_of_a_uniform_guess():
    """An error where the floor is at least half of a uniform guess's loss: over 2 classes a
    sigmoid's [0, 1] still allows ln(1 + 1/e) = 0.313 < ln 2 / 2 (a warning), over 3 it
    allows no less than ln(1 + 2/e) = 0.551 >= ln 3 / 2 (an error). A tanh's [-1, 1] over V
    classes allows ln(1 + (V - 1) / e^2): under half of ln V at 30 classes, over at 50."""

    def share(activation: str, classes: int) -> float:
        x = torch.randn(6, classes, requires_grad=True)
        squash = {"sigmoid": torch.sigmoid, "tanh": torch.tanh}[activation]
        read = squashed_logits(F.cross_entropy(squash(x), torch.randint(0, classes, (6,))))
        floor, uniform = squashed_floors(read)
        return floor / uniform

    assert share("sigmoid", 2) == pytest.approx(math.log1p(1 / math.e) / math.log(2))
    assert share("sigmoid", 2) < 0.5 <= share("sigmoid", 3)
    assert share("tanh", 30) < 0.5 <= share("tanh", 50)
    assert share("tanh", 50) == pytest.approx(math.log1p(49 / math.e**2) / math.log(50))
