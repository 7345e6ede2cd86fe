"""``log-softmax-dim``: an ``nll_loss`` or ``ctc_loss`` handed a ``log_softmax`` over another
dim than its classes, read from the first loss's graph (a real Recorder run each). The
reference is the values themselves: exp of the inputs sums to 1 over the dim that was
normalised, not over the classes. A CTC model is read as ``ctc_loss``, not as the
cross-entropy its ``log_softmax`` would suggest."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import stabscope
from stabscope import Recorder, RecorderConfig, Schedule
from stabscope.rules import check_run

STEPS = 3
CONFIG = RecorderConfig(schedule=Schedule(STEPS, 0), online_rules=False)


def run(tmp_path, name: str, loss_of) -> tuple[list, dict]:
    """Train a linear model a few steps with ``loss_of(outputs) -> (loss, log_probs, dim)``;
    the findings of the rule and meta.json."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(model, tmp_path / name, CONFIG) as rec:
        for _ in range(STEPS):
            loss, log_probs, classes_dim = loss_of(model)
            # The reference: these are no distribution over the classes, or are.
            sums = log_probs.detach().exp().sum(classes_dim)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss)
    found = [f for f in check_run(tmp_path / name).findings if f.rule == "log-softmax-dim"]
    return found, stabscope.read_meta(tmp_path / name) | {"sums": sums}


def nll(dim: int):
    def loss_of(model):
        x, y = torch.randn(32, 8), torch.randint(0, 5, (32,))
        log_probs = F.log_softmax(model(x), dim=dim)  # (32, 5)
        return F.nll_loss(log_probs, y), log_probs, 1

    return loss_of


def test_nll_loss_of_a_log_softmax_over_the_batch_is_an_error(tmp_path):
    (f,), meta = run(tmp_path, "dim0", nll(0))
    assert not torch.allclose(meta["sums"], torch.ones(32))  # not over the classes
    assert f.severity == "error" and (f.value, f.threshold) == (32, 5)
    assert "over its 5 classes (dim 1 of its (32, 5) input)" in f.message
    assert "normalised a dim of 32" in f.message and f.remedy.startswith("log_softmax over")


@pytest.mark.parametrize("dim", [1, -1])
def test_nll_loss_over_the_classes_is_nothing(tmp_path, dim):
    found, meta = run(tmp_path, f"dim{dim}", nll(dim))
    assert torch.allclose(meta["sums"], torch.ones(32)) and found == []


def ctc(dim: int):
    def loss_of(model):
        # Batch-first (N, T, C) = (4, 12, 5) scores, blank 0, targets of 3 labels 1..4.
        x = torch.randn(4, 12, 8)
        log_probs = F.log_softmax(model(x), dim=dim)
        targets = torch.randint(1, 5, (4, 3))
        loss = F.ctc_loss(
            log_probs.transpose(0, 1),  # (T, N, C)
            targets,
            torch.full((4,), 12),
            torch.full((4,), 3),
        )
        return loss, log_probs, 2

    return loss_of


def test_ctc_of_a_log_softmax_over_time_is_an_error(tmp_path):
    (f,), meta = run(tmp_path, "time", ctc(1))
    assert not torch.allclose(meta["sums"], torch.ones(4, 12))
    assert meta["loss_function"] == "ctc_loss"
    assert (f.value, f.threshold) == (12, 5) and "dim 2 of its (12, 4, 5) input" in f.message


def test_ctc_over_the_classes_is_nothing_and_no_cross_entropy(tmp_path):
    found, meta = run(tmp_path, "classes", ctc(-1))
    assert torch.allclose(meta["sums"], torch.ones(4, 12)) and found == []
    # Read as CTC: the rules that read a cross-entropy against ln V leave it alone.
    assert meta["loss_function"] == "ctc_loss" and "loss_classes" not in meta


def test_a_vocabulary_normalised_whole_then_narrowed_is_nothing(tmp_path):
    # log_softmax over all 5 outputs, then the nll_loss of 3 candidate classes: a partial
    # likelihood (it sums to less than 1 over the 3), not a log_softmax over the wrong dim.
    def loss_of(model):
        x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
        log_probs = F.log_softmax(model(x), dim=1)[:, :3]
        return F.nll_loss(log_probs, y), log_probs, 1

    found, meta = run(tmp_path, "narrowed", loss_of)
    assert (meta["sums"] < 1).all() and found == []
