"""Which loss function a loss is, read from its autograd graph (``record/loss_function.py``),
on real losses: torch's own functions, a hand-written cross-entropy, a cross-entropy with an
auxiliary regression term, a transformers model that computes its own loss, and losses with
no graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stabscope.record.loss_function import loss_function

torch.manual_seed(0)
LOGITS = torch.randn(8, 5, requires_grad=True)
LABELS = torch.randint(5, (8,))
TARGETS = torch.randn(8, 5)


def hand_written_ce() -> torch.Tensor:
    return -(F.log_softmax(LOGITS, -1) * F.one_hot(LABELS, 5)).sum(-1).mean()


def ce_plus_aux_mse() -> torch.Tensor:
    """The auxiliary term's node is met first, breadth-first: the cross-entropy still wins."""
    return 0.1 * F.cross_entropy(LOGITS, LABELS) + F.mse_loss(LOGITS, TARGETS)


def info_nce() -> torch.Tensor:
    """SimCLR's loss: a cross-entropy over the batch's 8 candidates of (8, 8) similarities of
    5-wide projections; its classes are the 8 candidates, not the 5 outputs."""
    z = F.normalize(LOGITS, dim=-1)
    return F.cross_entropy(z @ z.T / 0.5, torch.arange(8))


def bce() -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(LOGITS, TARGETS.sigmoid())


CE = ("cross_entropy", 5)
CASES = {
    "ce": (lambda: F.cross_entropy(LOGITS, LABELS), CE),
    "smoothed-ce-over-4": (lambda: F.cross_entropy(LOGITS, LABELS, label_smoothing=0.1) / 4, CE),
    "hand-written-ce": (hand_written_ce, CE),
    "ce-plus-aux-mse": (ce_plus_aux_mse, CE),
    "info-nce": (info_nce, ("cross_entropy", 8)),
    "mse": (lambda: F.mse_loss(LOGITS, TARGETS), ("mse_loss", None)),
    "smooth-l1": (lambda: F.smooth_l1_loss(LOGITS, TARGETS) * 2, ("smooth_l1_loss", None)),
    "bce": (bce, ("binary_cross_entropy_with_logits", None)),
    # A hand-written error: the graph was walked and holds no loss function torch names.
    "plain-ops": (lambda: (LOGITS - TARGETS).pow(2).mean(), ("other", None)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_loss_function_is_read_from_the_graph(case):
    make, want = CASES[case]
    assert loss_function(make()) == want


def test_a_loss_without_a_graph_says_nothing():
    assert loss_function(F.mse_loss(LOGITS, TARGETS).detach()) is None
    assert loss_function(torch.tensor(1.0)) is None


def test_a_loss_still_reads_after_its_backward():
    """The graph's nodes outlive the backward that freed their saved tensors."""
    loss = F.cross_entropy(LOGITS, LABELS)
    loss.backward()
    assert loss_function(loss) == CE


def test_a_transformers_model_that_computes_its_own_loss():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(32, (2, 8))
    assert loss_function(model(ids, labels=ids).loss) == ("cross_entropy", 32)
