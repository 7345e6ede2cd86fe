"""Attention entropy and max logit: SDPA, MultiheadAttention, explicit softmax and HF
attention, each against probabilities written out with an explicit softmax."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stabscope
from stabscope import Schedule
from stabscope.probes.attention import AttentionSampling, query_positions, sdpa_sample

SAMPLING = AttentionSampling(batch=2, queries=16)


def reference(q, k, allowed, scale=None):
    """Normalised entropy per head and max |logit|, from full explicit probabilities."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = scale or 1 / math.sqrt(q.shape[-1])
    logits = (q @ k.transpose(-2, -1)) * scale  # (B, H, L, S)
    allowed = allowed.expand_as(logits)
    p = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    keys = allowed.sum(-1)
    qi = query_positions(q.shape[2], SAMPLING.queries, q.device)
    ent, keys = ent[: SAMPLING.batch, :, qi], keys[: SAMPLING.batch, :, qi]
    valid = keys > 1
    norm = torch.where(valid, ent / torch.log(keys.clamp(min=2).float()), 0)
    mean = norm.sum((0, 2)) / valid.sum((0, 2))
    peak = logits.abs().masked_fill(~allowed, 0)[: SAMPLING.batch, :, qi].amax((0, 2, 3))
    return mean, peak


def qk(b=3, h=4, hk=4, length=40, source=40, e=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, length, e, generator=g) * 2, torch.randn(b, hk, source, e, generator=g)


def check(got, want):
    mean, peak = want
    np.testing.assert_allclose(got[:, 0].numpy(), mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(got[:, 1].numpy(), peak.numpy(), rtol=1e-5)


def test_sdpa_causal():
    q, k = qk()
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    check(sdpa_sample(q, k, None, True, None, SAMPLING), reference(q, k, causal))


def test_sdpa_boolean_and_float_masks_and_scale():
    q, k = qk(source=30)
    g = torch.Generator().manual_seed(1)
    allowed = torch.rand(3, 1, 40, 30, generator=g) > 0.4
    allowed[..., 0] = True
    check(sdpa_sample(q, k, allowed, False, 0.3, SAMPLING), reference(q, k, allowed, 0.3))
    additive = torch.zeros(3, 1, 40, 30).masked_fill(~allowed, float("-inf"))
    check(sdpa_sample(q, k, additive, False, 0.3, SAMPLING), reference(q, k, allowed, 0.3))
    hf_style = torch.zeros(3, 1, 40, 30).masked_fill(~allowed, torch.finfo(torch.float32).min)
    check(sdpa_sample(q, k, hf_style, False, 0.3, SAMPLING), reference(q, k, allowed, 0.3))


def test_sdpa_grouped_query_attention():
    q, k = qk(h=8, hk=2)
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    check(sdpa_sample(q, k, None, True, None, SAMPLING), reference(q, k, causal))


def test_uniform_attention_has_entropy_log_t():
    q, k = qk()
    got = sdpa_sample(torch.zeros_like(q), k, None, False, None, SAMPLING)
    np.testing.assert_allclose(got[:, 0].numpy(), 1.0, atol=1e-6)  # H = log T exactly


def gpt(attn: str):
    import gpt as sample

    cfg = stabscope.script.ScriptConfig(
        sample.CONFIG | {"depth": 2, "width": 32, "seq_len": 24, "attn": attn}
    )
    torch.manual_seed(0)
    return sample.model(cfg), next(sample.batches(cfg)), sample


def record(model, run_dir, forward):
    with stabscope.Recorder(model, run_dir, schedule=Schedule(1, 0), forward=forward) as rec:
        forward(model).backward()
        rec.step()
    return stabscope.load_run(run_dir, metrics=["attn_entropy", "attn_logit_max"])


def test_sample_gpt_sdpa_matches_explicit_softmax(tmp_path):
    import stabscope.script  # noqa: F401

    sdpa, batch, sample = gpt("sdpa")
    explicit = copy.deepcopy(sdpa)
    for block in explicit.blocks:
        block.attn.attn = "explicit"
    a = record(sdpa, tmp_path / "a", lambda m: sample.loss(m, batch))
    b = record(explicit, tmp_path / "b", lambda m: sample.loss(m, batch))
    assert len(a) == len(b) == 2 * 2 * 4  # 2 layers x 2 metrics x 4 heads
    key = ["module", "metric", "index"]
    merged = a.merge(b, on=key, suffixes=("_sdpa", "_explicit"))
    np.testing.assert_allclose(merged.value_sdpa, merged.value_explicit, rtol=1e-5, atol=1e-5)


def test_zero_queries_turn_the_probe_off(tmp_path):
    """attn_queries=0 records no attention rows (not zero entropies that would read as
    collapse), and the rest of the standard preset is still there."""
    import stabscope.script

    model, batch, sample = gpt("sdpa")
    config = stabscope.RecorderConfig(schedule=Schedule(1, 0), attn_queries=0)
    forward = lambda m: sample.loss(m, batch)  # noqa: E731
    with stabscope.Recorder(model, tmp_path / "r", config, forward=forward) as rec:
        forward(model).backward()
        rec.step()
    metrics = set(stabscope.load_run(tmp_path / "r").metric.astype(str))
    assert not {m for m in metrics if m.startswith("attn_")}
    assert {"res_ratio", "token_corr", "grad_rms"} <= metrics


def test_multihead_attention_with_padding(tmp_path):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(3, 20, 16)
    pad = torch.zeros(3, 20, dtype=torch.bool)
    pad[:, 15:] = True  # the last five keys are padding

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, key_padding_mask=pad)[0]

    model = nn.Sequential(Wrap(), nn.Linear(16, 16))
    # Sequential of one layer type: make the structure explicit instead of discovered.
    from stabscope.structure import AttentionInfo, Block, Structure

    structure = Structure(
        True, [Block("0", 0, "", "unknown", 1.0, [], [AttentionInfo("0.attn", 4)])]
    )
    with stabscope.Recorder(model, tmp_path, schedule=Schedule(1, 0), structure=structure) as rec:
        model(x).pow(2).mean().backward()
        rec.step()
    df = stabscope.load_run(tmp_path, metrics="attn_entropy").sort_values("index")
    with torch.no_grad():
        _, weights = mha(x, x, x, key_padding_mask=pad, average_attn_weights=False)
    qi = query_positions(20, 16, x.device)
    w = weights[:2, :, qi]  # (b, H, q, S)
    ent = -(w * torch.log(w.clamp_min(1e-30))).sum(-1) / math.log(15)
    np.testing.assert_allclose(df.value, ent.mean((0, 2)).numpy(), atol=1e-5)


def test_hf_llama_sdpa_matches_eager(tmp_path):
    transformers = pytest.importorskip("transformers")
    values = []
    for impl in ("sdpa", "eager"):
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=50,
            attn_implementation=impl,
        )
        model = transformers.LlamaForCausalLM(config)
        ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
        df = record(model, tmp_path / impl, lambda m, ids=ids: m(input_ids=ids, labels=ids).loss)
        values.append(df.sort_values(["module", "metric", "index"]).reset_index(drop=True))
    assert len(values[0]) == 2 * 2 * 4
    np.testing.assert_allclose(values[0].value, values[1].value, rtol=1e-5, atol=1e-5)


def test_attention_probe_leaves_outputs_unchanged(tmp_path):
    model, batch, sample = gpt("sdpa")
    twin = copy.deepcopy(model)
    with stabscope.Recorder(
        model, tmp_path, schedule=Schedule(1, 0), forward=lambda m: sample.loss(m, batch)
    ) as rec:
        out = model(batch[:, :-1])
        rec.step()
    assert torch.equal(out, twin(batch[:, :-1]))
    assert F.scaled_dot_product_attention is torch.nn.functional.scaled_dot_product_attention
