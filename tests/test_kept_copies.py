"""Weight copies kept from one recorded step for the next: the update and weight norms they give
against weights snapshotted around every optimizer step, also when something changes the weights
between two recorded steps (in place, through ``.data``, or by replacing the storage)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import stabscope
from stabscope import Schedule
from stabscope.probes import host_kernels, host_params
from tests.conftest import batch_maker, mlp

pytestmark = pytest.mark.skipif(not host_kernels.AVAILABLE, reason="numba is not installed")

STEPS = 4


def run(run_dir, between, monkeypatch):
    """Every step recorded; ``between(model)`` runs after each step. Returns (recorded, reference,
    how many pre-step passes read and copied the weights)."""
    torch.manual_seed(0)
    model, make = mlp(), batch_maker(6, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    copying = []
    original = host_params.squares_and_copy
    monkeypatch.setattr(
        host_params, "squares_and_copy", lambda *a: copying.append(1) or original(*a)
    )
    reference = {}
    with stabscope.Recorder(model, run_dir, schedule=Schedule(dense=STEPS, every=0)) as rec:
        for step in range(STEPS):
            x, y = make(step)
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt.step()
            for n, p in model.named_parameters():
                reference[(step, n, "param_norm")] = before[n].double().norm().item()
                delta = (p.detach() - before[n]).double().norm().item()
                reference[(step, n, "update_norm")] = delta
            rec.step(loss=loss)
            between(model)
    df = stabscope.load_run(run_dir, metrics=["param_norm", "update_norm"])
    got = {(int(r.step), str(r.module), str(r.metric)): float(r.value) for r in df.itertuples()}
    return got, reference, len(copying)


def check(got, reference):
    assert got.keys() == reference.keys()
    keys = sorted(reference)
    np.testing.assert_allclose(
        [got[k] for k in keys], [reference[k] for k in keys], rtol=1e-5, atol=1e-7
    )


def test_unchanged_weights_use_the_kept_copy(run_dir, monkeypatch):
    got, reference, copying = run(run_dir, lambda model: None, monkeypatch)
    check(got, reference)
    assert copying == 1  # only step 0 copies before its optimizer step


def scale_in_place(model):
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)  # bumps the version counter


def scale_through_data(model):
    for p in model.parameters():
        p.data.mul_(0.5)  # .data has a version counter of its own: seen by the sampled check


def replace_storage(model):
    for p in model.parameters():
        p.data = p.data * 0.5  # a new tensor: a new address


def nudge_one_sampled_element(model):
    next(model.parameters()).data.view(-1)[0] += 1.0  # element 0 is sampled


def nudge_one_unsampled_element_in_place(model):
    with torch.no_grad():
        next(model.parameters()).view(-1)[1] += 1.0  # not sampled, but the version moves


@pytest.mark.parametrize(
    "between",
    [
        scale_in_place,
        scale_through_data,
        replace_storage,
        nudge_one_sampled_element,
        nudge_one_unsampled_element_in_place,
    ],
)
def test_changed_weights_are_copied_again(run_dir, monkeypatch, between):
    got, reference, copying = run(run_dir, between, monkeypatch)
    check(got, reference)
    assert copying == STEPS
