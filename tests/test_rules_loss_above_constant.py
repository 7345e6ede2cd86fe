"""``loss-above-constant`` and the bar it reads (the run's ``loss_constant`` of every step).

The bar is checked against the loss of the constant prediction itself, computed here from
the scripts' own targets: the batch mean predicted for every row (Bessel-corrected), and for
a binary cross-entropy each label's base rate (Miller-Madow-corrected). The rule is checked
on a real regression script left in raw target units (mean 250, sd 80) at a small learning
rate, against the same script on standardised targets, and on two optimizers."""

from __future__ import annotations

import math
import statistics
import warnings

import pytest
import torch
import torch.nn.functional as F

import stabscope
from stabscope.drivers.zerocode import profile_training_script
from stabscope.record.config import RecorderConfig
from stabscope.record.constant_loss import constant_loss, constant_read, merge_reads
from stabscope.rules import check_run
from stabscope.rules.above_constant import end_ratio
from stabscope.rules.view import RunView
from stabscope.store import RUN_MODULE
from tests.scripts import train_mlp, train_regression
from tests.scripts.harness import record, values
from tests.test_cli import invoke


def test_mse_bar_is_the_loss_of_predicting_the_targets_mean():
    """One constant for every element (which dim is the batch is not known): the targets'
    mean, its loss Bessel-corrected over the 30 values."""
    torch.manual_seed(0)
    out = torch.randn(10, 3, requires_grad=True)
    target = 5 + 2 * torch.randn(10, 3)
    mean_prediction = target.mean().expand_as(target)
    reference = F.mse_loss(mean_prediction, target).item() * 30 / 29
    loss = F.mse_loss(out, target)
    assert constant_loss(loss).item() == pytest.approx(reference, rel=1e-5)
    # In the loss's units: an accumulation's loss / 4, a sum over the elements.
    assert constant_loss(F.mse_loss(out, target) / 4).item() == pytest.approx(reference / 4)
    summed = F.mse_loss(out, target, reduction="sum") * 0.5
    assert constant_loss(summed).item() == pytest.approx(reference * 30 * 0.5, rel=1e-5)


def test_a_broadcast_mse_is_read_over_its_broadcast(tmp_path):
    """An output (B, 1) against a target (B,): mse_loss reads every output against every
    target, so one constant can be learned, the targets' mean: its loss is their variance
    (Bessel-corrected over the B targets), also where autocast copied the output."""
    torch.manual_seed(0)
    y = 3 + 2 * torch.randn(12)
    head = torch.nn.Linear(4, 1)
    x = torch.randn(12, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mse_loss warns of the broadcast
        plain = F.mse_loss(head(x), y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = F.mse_loss(head(x), y)
    for loss in (plain, cast):
        assert constant_loss(loss).item() == pytest.approx(y.var(correction=1).item(), rel=1e-5)


def test_bce_bar_is_the_entropy_of_each_labels_base_rate():
    torch.manual_seed(0)
    logits = torch.randn(20, 4, requires_grad=True)
    labels = (torch.rand(20, 4) < torch.tensor([0.1, 0.5, 0.8, 0.0])).float()
    rate = labels.mean(0, keepdim=True).expand_as(labels)
    plug_in = F.binary_cross_entropy(rate, labels, reduction="none").mean(0)  # (4,) nats
    mixed = ((rate[0] > 0) & (rate[0] < 1)).float()
    reference = (plug_in + mixed / (2 * 20)).mean().item()
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    assert constant_loss(loss).item() == pytest.approx(reference, rel=1e-5)
    probs = F.binary_cross_entropy(torch.sigmoid(logits), labels)
    assert constant_loss(probs).item() == pytest.approx(reference, rel=1e-5)


def test_soft_binary_targets_read_no_bar():
    """A teacher's probabilities or smoothed labels carry their own entropy, a floor no
    model goes below: the bar of hard labels would call a perfect student no better than
    a constant."""
    logits = torch.randn(16, 3, requires_grad=True)
    hard = (torch.rand(16, 3) < 0.3).float()
    for soft in (torch.rand(16, 3), hard * 0.9 + 0.05):
        loss = F.binary_cross_entropy_with_logits(logits, soft)
        assert math.isnan(constant_loss(loss).item())
    assert math.isfinite(constant_loss(F.binary_cross_entropy_with_logits(logits, hard)).item())


def test_losses_without_such_a_bar_read_nothing():
    out = torch.randn(8, 2, requires_grad=True)
    target = torch.randn(8, 2)
    labels = (target > 0).float()
    assert constant_loss(F.mse_loss(out, target) + out.square().mean()) is None  # two terms
    assert constant_loss(F.l1_loss(out, target)) is None
    assert constant_loss(F.binary_cross_entropy_with_logits(out, labels, weight=labels)) is None
    assert constant_loss(F.mse_loss(out[:1, :1], target[:1, :1])) is None  # one value
    freed = F.mse_loss(out, target)
    freed.backward()
    assert constant_loss(freed) is None  # backward freed the saved targets


def test_every_step_holds_its_bar_with_accumulation(tmp_path):
    """train_mlp's targets are a frozen teacher's outputs, two micro-batches a step, each
    loss / 2: the step's bar is the sum of the two micro-batches' halves."""
    run, _ = record(tmp_path, "train_mlp.py", "--steps", "12", "--accum", "2")
    _, teacher = train_mlp.make_model()
    expected = []
    for step in range(12):
        bars = []
        for micro in range(2):
            target = teacher(train_mlp.batch(step, micro))  # (B, T, D)
            mean = target.mean().expand_as(target)
            n = target.numel()
            bars.append(F.mse_loss(mean, target).item() * n / (n - 1) / 2)
        expected.append(sum(bars))
    got = values(run, RUN_MODULE, "loss_constant")
    assert list(got.step) == list(range(12))
    assert got.value.tolist() == pytest.approx(expected, rel=1e-5)


def raw_regression(tmp_path, *args: str, rule: str = "loss-above-constant") -> tuple:
    run, log = record(tmp_path, "train_regression.py", *args, budget=120)
    found = [f for f in check_run(run).findings if f.rule == rule]
    return run, [row["loss"] for row in log], found


def bar_of(step: int, accum: int, signal: bool = True, grouped: bool = False) -> float:
    """train_regression's step bar: the micro-batches' Bessel-corrected variances / accum."""
    return sum(
        train_regression.data(step, micro, signal, grouped)[1].var(0, correction=1).item() / accum
        for micro in range(accum)
    )


@pytest.mark.slow
def test_a_regression_on_raw_targets_ends_above_its_targets_variance(tmp_path):
    _, losses, found = raw_regression(tmp_path, "--accum", "2")
    # The script's own losses over the last 16 steps against their steps' bars.
    last = range(104, 120)
    ratio = sum(losses[s] for s in last) / sum(bar_of(s, 2) for s in last)
    (error,) = found
    assert error.severity == "error"
    assert error.value == pytest.approx(ratio, rel=1e-4)
    assert error.value > 2 and "predicting its targets' mean" in error.message
    variance = train_regression.SD**2 + train_regression.NOISE**2  # 6,800
    assert statistics.mean(bar_of(s, 2) for s in range(120)) == pytest.approx(variance, rel=0.1)


@pytest.mark.slow
def test_standardised_targets_and_two_optimizers_are_not_flagged(tmp_path):
    _, losses, found = raw_regression(tmp_path / "std", "--standardize")
    assert statistics.median(losses[-6:]) < 0.2 and found == []
    # The same raw-target failure, its head under a second optimizer: a run whose step may
    # sum two players' losses (a GAN's) is not judged.
    _, losses, found = raw_regression(tmp_path / "two", "--two-optimizers")
    assert statistics.median(losses[-6:]) > 6_800 and found == []


@pytest.mark.slow
def test_a_regression_whose_inputs_carry_nothing_ends_at_its_targets_variance(tmp_path):
    """Standardised targets drawn apart from the inputs: the model learns their mean and no
    more, its loss / bar at 1.00 (within noise); with the inputs that carry them it is far
    below, and neither rule fires."""
    _, losses, found = raw_regression(
        tmp_path / "none", "--standardize", "--no-signal", rule="no-better-than-constant"
    )
    last = range(104, 120)
    bars = sum(bar_of(s, 1, signal=False) / train_regression.SD**2 for s in last)
    (error,) = found
    assert error.value == pytest.approx(sum(losses[s] for s in last) / bars, rel=1e-4)
    assert 0.95 < error.value < 1.05 and "explains under 5%" in error.message
    nothing = "no-better-than-constant"
    assert raw_regression(tmp_path / "std", "--standardize", rule=nothing)[2] == []
    # Worse than the constant is the other rule's case alone.
    assert raw_regression(tmp_path / "raw", rule=nothing)[2] == []


MODEL_SCRIPT = """
import torch
import torch.nn.functional as F
from torch import nn

CONFIG = {"batch_size": 16}


def model(cfg):
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))


def batches(cfg):
    g = torch.Generator().manual_seed(5)
    while True:
        x = torch.randn(cfg.batch_size, 3, generator=g)
        yield x, 10 + 3 * torch.randn(cfg.batch_size, 2, generator=g)


def loss(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)
"""


def test_a_model_scripts_loss_gets_its_bar_too(tmp_path):
    """``stabscope profile`` on a model script computes the loss itself: the bar is read
    before its backward, each step the Bessel-corrected variance of that step's targets."""
    script = tmp_path / "regress.py"
    script.write_text(MODEL_SCRIPT)
    run = tmp_path / "run"
    result = invoke("profile", script, "--steps", 6, "--out", run, "-q")
    assert result.exit_code == 0, result.output
    g = torch.Generator().manual_seed(5)
    expected = []
    for _ in range(6):
        torch.randn(16, 3, generator=g)
        y = 10 + 3 * torch.randn(16, 2, generator=g)  # (B, 2)
        expected.append(y.var(correction=1).item())
    got = values(run, RUN_MODULE, "loss_constant")
    assert got.value.tolist() == pytest.approx(expected, rel=1e-5)


def test_cross_entropy_bar_is_the_entropy_of_the_batchs_labels():
    """A contrastive loss over the batch (each row's positive its own column): exactly ln N.
    A classifier: the loss of predicting the batch's label frequencies (computed here with
    nll_loss of their logs) plus the Miller-Madow correction, ignored rows left out. A batch
    with fewer than 5 rows per label seen reads nothing."""
    torch.manual_seed(0)
    sims = torch.randn(16, 16, requires_grad=True)
    assert constant_loss(F.cross_entropy(sims, torch.arange(16))).item() == pytest.approx(
        math.log(16)
    )
    logits = torch.randn(64, 4, requires_grad=True)
    labels = torch.randint(4, (64,))
    labels[:5] = -100
    kept = labels[labels >= 0]
    rate = torch.bincount(kept, minlength=4).float() / len(kept)  # (4,)
    frequencies = rate.log().expand(len(kept), 4)
    reference = F.nll_loss(frequencies, kept).item() + (4 - 1) / (2 * len(kept))
    assert constant_loss(F.cross_entropy(logits, labels)).item() == pytest.approx(reference)
    halved = F.cross_entropy(logits, labels) / 2
    assert constant_loss(halved).item() == pytest.approx(reference / 2, rel=1e-5)
    rare = F.cross_entropy(torch.randn(20, 100, requires_grad=True), torch.randint(100, (20,)))
    assert math.isnan(constant_loss(rare).item())


CONTRASTIVE = """
import sys
import torch
import torch.nn.functional as F
from torch import nn

torch.manual_seed(0)
query, doc = nn.Linear(8, 16), nn.Linear(8, 16)
opt = torch.optim.Adam([*query.parameters(), *doc.parameters()], lr=1e-2)
broken = sys.argv[1] == "broken"
g = torch.Generator().manual_seed(1)
for step in range(120):
    x = torch.randn(32, 8, generator=g)
    pair = x + 0.3 * torch.randn(32, 8, generator=g)  # each row's positive
    if broken:  # the query tower re-initialised every step: nothing it learns is kept
        query.reset_parameters()
    sims = F.normalize(query(x), dim=1) @ F.normalize(doc(pair), dim=1).T / 0.1  # (32, 32)
    loss = F.cross_entropy(sims, torch.arange(32))
    opt.zero_grad()
    loss.backward()
    opt.step()
"""


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["broken", "healthy"])
def test_a_contrastive_model_that_keeps_nothing_ends_at_ln_of_its_batch(tmp_path, variant):
    script = tmp_path / "towers.py"
    script.write_text(CONTRASTIVE)
    run = tmp_path / variant
    profile_training_script(script, [variant], run, RecorderConfig(), budget=120)
    bars = values(run, RUN_MODULE, "loss_constant").value
    assert len(bars) == 120 and bars.to_numpy() == pytest.approx(math.log(32))
    rules = {"no-better-than-constant", "loss-above-constant"}
    found = [f for f in check_run(run).findings if f.rule in rules]
    if variant == "broken":  # random similarities at temperature 0.1: confidently wrong
        (error,) = found
        assert error.rule == "loss-above-constant" and error.value > 1.05
    else:
        assert found == []


def test_target_moments_come_with_the_bar_and_merge_over_micro_batches():
    """Each call's targets' count, mean and variance, and the step's over its calls as if
    their targets were one batch (computed here by concatenating them)."""
    torch.manual_seed(0)
    out = torch.randn(10, 3, requires_grad=True)
    parts = [5 + 2 * torch.randn(10, 3), -1 + torch.randn(10, 3), 7 * torch.randn(10, 3)]
    reads = [constant_read(F.mse_loss(out, t) / 3) for t in parts]
    first = reads[0]
    assert first[1:].tolist() == pytest.approx(
        [30, parts[0].mean().item(), parts[0].var().item()], rel=1e-5
    )
    merged = merge_reads(reads)
    together = torch.cat(parts)
    assert merged[0].item() == pytest.approx(sum(r[0].item() for r in reads), rel=1e-6)
    assert merged[1:].tolist() == pytest.approx(
        [90, together.mean().item(), together.var().item()], rel=1e-5
    )
    # One binary label: its rate, and the Bernoulli variance (Bessel-corrected).
    labels = (torch.rand(40) < 0.3).float()
    read = constant_read(
        F.binary_cross_entropy_with_logits(torch.randn(40, requires_grad=True), labels)
    )
    assert read[1:].tolist() == pytest.approx([40, labels.mean().item(), labels.var().item()])
    # Several labels, or a cross-entropy: a bar, no moments.
    several = constant_read(
        F.binary_cross_entropy_with_logits(
            torch.randn(40, 2, requires_grad=True), (torch.rand(40, 2) < 0.5).float()
        )
    )
    classes = constant_read(
        F.cross_entropy(torch.randn(64, 3, requires_grad=True), torch.randint(3, (64,)))
    )
    for read in (several, classes):
        assert math.isfinite(read[0].item()) and read[1:].isnan().all()


@pytest.mark.slow
def test_batches_of_one_group_are_read_against_one_constant_for_the_window(tmp_path):
    """Each batch one group with an offset no input reveals (sd 2 in standardised units):
    each batch's own variance leaves that offset out, so a model that learned everything
    it can ends near 4x its batches' bars. One constant for the whole window scores the
    within-batch variance plus the offsets' (the law of total variance): the healthy model
    is well under it, and one whose inputs carry nothing sits at it."""
    _, losses, found = raw_regression(tmp_path / "ok", "--standardize", "--grouped")
    last = range(104, 120)
    own = sum(bar_of(s, 1, grouped=True) for s in last) / train_regression.SD**2
    assert sum(losses[s] for s in last) / own > 2  # what the batches' own bars read
    assert found == []
    assert raw_regression(tmp_path / "ok2", "--standardize", "--grouped", rule=NOTHING)[2] == []
    # Nothing to learn: the loss over one constant's, that constant the window's targets'
    # mean, from all 16 batches' targets together (the same 2 standard errors of noise
    # as the rule's are far wider here: 16 draws of an offset).
    run, losses, _ = raw_regression(
        tmp_path / "none", "--standardize", "--grouped", "--no-signal", rule=NOTHING
    )
    targets = torch.cat([train_regression.data(s, 0, signal=False, grouped=True)[1] for s in last])
    pooled = targets.var().item() / train_regression.SD**2
    read = end_ratio(RunView.open(run), 100, 16)
    expected = sum(losses[s] for s in last) / (16 * pooled)
    assert read is not None and read.ratio == pytest.approx(expected, rel=1e-4)
    assert 0.8 < read.ratio < 1.2


NOTHING = "no-better-than-constant"

DRIFTING_CLICKS = """
import torch
import torch.nn.functional as F
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
g = torch.Generator().manual_seed(1)
w = torch.tensor([2.0, -1.0, 1.0, 0.5])
for step in range(200):
    x = torch.randn(64, 4, generator=g)
    # The hour of day no input reveals: the click rate swings between batches.
    shift = 2.5 if step % 2 else -2.5
    y = (torch.rand(64, generator=g) < torch.sigmoid(x @ w + shift)).float()
    loss = F.binary_cross_entropy_with_logits(model(x).squeeze(1), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
"""


@pytest.mark.slow
def test_a_binary_rate_that_swings_between_batches_is_pooled(tmp_path):
    """A click model whose batches alternate between rates near 0.1 and 0.9: each batch's
    own rate's entropy is far below what one rate for every batch scores, the entropy of
    the pooled rate, which the rule reads (computed here from the recorded rates)."""
    script = tmp_path / "clicks.py"
    script.write_text(DRIFTING_CLICKS)
    run = tmp_path / "run"
    profile_training_script(script, [], run, RecorderConfig(), budget=200)
    found = [f for f in check_run(run).findings if f.rule in {NOTHING, "loss-above-constant"}]
    assert found == []
    rates = values(run, RUN_MODULE, "target_mean").value.to_numpy()[-20:]
    bars = values(run, RUN_MODULE, "loss_constant").value.to_numpy()[-20:]
    pooled = rates.mean()
    entropy = -(pooled * math.log(pooled) + (1 - pooled) * math.log(1 - pooled))
    read = end_ratio(RunView.open(run), 100, 16)
    losses = stabscope.load_run(run, modules=[RUN_MODULE], metrics=["loss"]).value.to_numpy()
    assert read is not None
    assert read.ratio == pytest.approx(losses[-20:].sum() / (20 * entropy), rel=0.02)
    assert losses[-20:].sum() / bars.sum() > 1.05  # what each batch's own bar reads


def test_a_library_mode_loop_hands_over_its_bar_before_backward(tmp_path):
    """``rec.step(loss)`` comes after the backward freed the targets: a loop that wants the
    bar reads it first, with its moments (``constant_read``) or the bar alone
    (``constant_loss``), and both land as the step's rows."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    targets = []
    with stabscope.Recorder(model, tmp_path / "run", preset="cheap") as rec:
        for step in range(4):
            x, y = torch.randn(16, 3), 2 + torch.randn(16, 1)
            targets.append(y)
            loss = F.mse_loss(model(x), y)
            read = constant_read(loss) if step % 2 == 0 else constant_loss(loss)
            rec.note_constant_loss(read)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss)
    run = tmp_path / "run"
    bars = values(run, RUN_MODULE, "loss_constant").value.tolist()
    assert bars == pytest.approx([y.var().item() for y in targets], rel=1e-5)
    means = values(run, RUN_MODULE, "target_mean")
    assert list(means.step) == [0, 2]  # the bar alone carries no moments
    assert means.value.tolist() == pytest.approx([targets[s].mean().item() for s in (0, 2)])
