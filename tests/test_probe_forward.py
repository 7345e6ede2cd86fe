"""The probe forward captured from training itself: which outputs hold a loss, and zero-code
mode measuring the stability index on a script whose model computes its loss, equal to the
index computed here by hand, with the training bit-identical to a run without stabscope."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import stabscope
from stabscope.probes.sharpness import scalar_loss, stability_index
from stabscope.record.probe_forward import detached_copy
from tests.scripts import train_lm_loss
from tests.scripts.harness import plain, record, values


def is_loss(found: torch.Tensor | None, loss: torch.Tensor) -> bool:
    """``found`` is ``loss`` as a 0-d tensor in ``loss``'s graph."""
    return found is not None and found.shape == () and found.data_ptr() == loss.data_ptr()


def test_scalar_loss_takes_only_an_unambiguous_scalar():
    w = torch.ones(3, requires_grad=True)
    loss = (w * 2).sum()  # 0-d, requires grad
    logits = w * 3  # (3,)
    assert is_loss(scalar_loss(loss), loss)
    assert is_loss(scalar_loss((logits, loss)), loss)  # nanoGPT's (logits, loss)
    assert is_loss(scalar_loss([loss.reshape(1, 1), logits]), loss)
    assert is_loss(scalar_loss({"loss": loss, "logits": logits}), loss)
    assert scalar_loss(logits) is None and scalar_loss((logits, None)) is None
    assert scalar_loss((loss, loss * 2)) is None  # two candidates: not guessed
    assert scalar_loss((logits, loss.detach())) is None  # no graph to differentiate
    assert scalar_loss({"logits": logits}) is None


def test_scalar_loss_of_a_transformers_model_output():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    config.bos_token_id = config.eos_token_id = 0
    model = GPT2LMHeadModel(config)
    model.eval()  # no dropout: the two calls below compute the same loss
    ids = torch.randint(0, 32, (2, 8))
    out = model(input_ids=ids, labels=ids)
    assert is_loss(scalar_loss(out), out.loss)
    assert scalar_loss(model(input_ids=ids)) is None  # no labels: logits only
    as_tuple = model(input_ids=ids, labels=ids, return_dict=False)
    assert torch.equal(scalar_loss(as_tuple), out.loss)


def test_detached_copy_keeps_the_structure_and_owns_its_tensors():
    Pair = namedtuple("Pair", "x y")
    x = torch.randn(2, 3, requires_grad=True)
    batch = {"pair": Pair(x * 1, [torch.zeros(2)]), "n": 3}
    copy = detached_copy(batch)
    assert isinstance(copy["pair"], Pair) and copy["n"] == 3
    assert torch.equal(copy["pair"].x, x) and not copy["pair"].x.requires_grad
    batch["pair"].y[0].add_(1.0)  # the user reuses the batch buffer in place
    assert torch.equal(copy["pair"].y[0], torch.zeros(2))


def hand_indices(steps: int) -> dict[int, float]:
    """train_lm_loss's loop by hand, measuring the index after steps 2 and 4 on batch 0."""
    model, opt = train_lm_loss.make_model()
    x, y = train_lm_loss.batch(0)
    found = {}
    for step in range(steps):
        train_lm_loss.train_step(model, opt, step)
        if step in (2, 4):
            value, lr = stability_index(model, lambda m: m(x, y), [opt])
            assert lr == 3e-3
            found[step] = value
    return found


@pytest.mark.slow
def test_zero_code_measures_the_index_of_a_model_that_returns_its_loss(tmp_path):
    weights = tmp_path / "recorded.pt"
    run, recorded = record(tmp_path, "train_lm_loss.py", "--steps", "5", "--save", str(weights))
    index = values(run, "__run__", "stability_index")
    assert index.step.tolist() == [2, 4]
    want = hand_indices(5)
    assert index.value.tolist() == pytest.approx([want[2], want[4]], rel=1e-5)
    assert (index.value > 0).all()
    # Training is bit-identical to the script run without stabscope: losses and weights.
    unrecorded = tmp_path / "plain.pt"
    args = ("--steps", "5", "--save", str(unrecorded))
    assert recorded == plain(tmp_path, "train_lm_loss.py", *args)
    a, b = torch.load(weights), torch.load(unrecorded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_forward_that_raises_is_noted_and_training_goes_on(tmp_path):
    """A replayed step may raise anything (a training_step reading a key the batch copy
    lacks): the measurements stop with a note, the training is not interrupted."""
    from tests.conftest import batch_maker, mlp, train

    def forward(model: torch.nn.Module) -> torch.Tensor:
        raise KeyError("labels")

    model = mlp()
    rec = stabscope.Recorder(model, tmp_path / "run")
    assert rec.wants_probe_forward
    rec.set_probe_forward(forward)
    assert not rec.wants_probe_forward
    with rec:
        train(model, 4, batch_maker(6, 3), rec=rec)
    assert stabscope.read_meta(tmp_path / "run")["steps"] == 4
    assert "stability_index not measured: KeyError: 'labels'" in rec.meta["notes"]
