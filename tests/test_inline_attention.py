"""Attention written in a block's own forward, with no attention module: structure discovery
finds it from the attention call itself (``F.scaled_dot_product_attention`` run while the
block is the innermost module), names the block its holder and the branch an attention one,
and the attention probe samples it there. The reference is the sample GPT whose attention is
a module: the same weights give the same entropies and logit maxima, whether the structure
comes from a probe forward or from the first recorded training step."""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import stabscope
from stabscope import Schedule
from stabscope.structure import discover
from tests.test_probes_attention import gpt, record_steps


def inline_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The sample GPT's pre-LN block with its attention module's code run on the block's own
    call: the module ``attn`` is never called, its projections are."""
    x = x + type(self.attn).forward(self.attn, self.ln1(x))
    return x + self.mlp(self.ln2(x))


def inlined(model: torch.nn.Module) -> torch.nn.Module:
    out = copy.deepcopy(model)
    for block in out.blocks:
        block.forward = types.MethodType(inline_forward, block)
    return out


def by_layer(rows):
    """Rows keyed by block number, metric and head, in one order (module names differ)."""
    rows = rows.assign(layer=rows.module.astype(str).str.split(".").str[1].astype(int))
    return rows.sort_values(["layer", "metric", "index"]).reset_index(drop=True)


@pytest.mark.slow
def test_inline_attention_is_found_in_the_block_that_runs_it():
    model, batch, sample = gpt("sdpa")
    s = discover(inlined(model), lambda m: sample.loss(m, batch))
    assert [[a.name for a in b.attention] for b in s.blocks] == [["blocks.0"], ["blocks.1"]]
    assert [a.heads for b in s.blocks for a in b.attention] == [model.blocks[0].attn.heads] * 2
    assert [[br.kind for br in b.branches] for b in s.blocks] == [["attention", "mlp"]] * 2
    # The module form names its attention module, as before.
    s = discover(model, lambda m: sample.loss(m, batch))
    assert [[a.name for a in b.attention] for b in s.blocks] == [
        ["blocks.0.attn"],
        ["blocks.1.attn"],
    ]


@pytest.mark.slow
def test_inline_attention_records_what_the_attention_module_records(tmp_path):
    model, batch, sample = gpt("sdpa")
    forward = lambda m: sample.loss(m, batch)  # noqa: E731
    reference = record_steps(copy.deepcopy(model), tmp_path / "module", forward)
    steps = record_steps(inlined(model), tmp_path / "inline", forward)
    assert set(steps[0].module.astype(str)) == {"blocks.0", "blocks.1"}
    for step in steps:
        np.testing.assert_allclose(
            by_layer(step).value, by_layer(reference[0]).value, rtol=1e-6, atol=1e-7
        )


@pytest.mark.slow
def test_inline_attention_found_from_the_first_training_step(tmp_path):
    """No probe forward: the structure comes from step 0's own forward, traced while it
    trains (the attention calls are watched inside the model's call only), and the attention
    is sampled from step 1. The step's loss is the same as without the tool."""
    model, batch, sample = gpt("sdpa")
    plain = inlined(model)
    expected = float(sample.loss(plain, batch).detach())
    watched = inlined(model)
    with stabscope.Recorder(watched, tmp_path / "run", schedule=Schedule(3, 0)) as rec:
        for _ in range(3):
            loss = sample.loss(watched, batch)
            assert float(loss.detach()) == expected  # no optimizer: the same weights every step
            loss.backward()
            rec.step(loss)
            assert not torch._C._is_torch_function_mode_enabled()  # nothing left pushed
            assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    rows = stabscope.load_run(tmp_path / "run", metrics=["attn_entropy", "attn_logit_max"])
    reference = record_steps(
        copy.deepcopy(model), tmp_path / "module", lambda m: sample.loss(m, batch)
    )
    assert sorted(rows.step.unique()) == [1, 2]
    for _, step in rows.groupby("step"):
        np.testing.assert_allclose(
            by_layer(step).value, by_layer(reference[0]).value, rtol=1e-6, atol=1e-7
        )
