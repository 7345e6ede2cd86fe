"""Attention entropy and max logit: SDPA, MultiheadAttention, explicit softmax and HF
attention, each against probabilities written out with an explicit softmax."""

from __future__ import annotations

import copy
import json
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


def spread_rows(batch, length, rows=SAMPLING.batch * SAMPLING.queries):
    """The entropy's rows as documented: r = rows // batch per sequence (at least 1), from a
    grid of batch·r evenly spaced positions, sequence i taking grid points i, i+batch, ..."""
    r = max(1, rows // batch)
    grid = query_positions(length, batch * r, torch.device("cpu")).tolist()
    return [
        [grid[(i + j * batch) % len(grid)] for j in range(min(r, len(grid)))] for i in range(batch)
    ]


def reference(q, k, allowed, scale=None, causal=None):
    """Normalised entropy per head and max |logit|, from full explicit probabilities: the
    entropy over the spread rows, the max over those and, in every sequence and head, the
    ``SAMPLING.peak`` queries with the largest ‖q_i‖ · max ‖k_j‖ over the keys j ≤ i
    (``causal``; by default: whether ``allowed`` is the causal mask) or all keys."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = scale or 1 / math.sqrt(q.shape[-1])
    logits = (q @ k.transpose(-2, -1)) * scale  # (B, H, L, S)
    allowed = allowed.expand_as(logits)
    p = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # (B, H, L)
    keys = allowed.sum(-1)
    # The max |logit| reads the allowed keys that carry softmax weight: within 100 nats of
    # their row's largest (a finite mask fill such as -1e9 is not one of the model's logits).
    top = logits.masked_fill(~allowed, float("-inf")).amax(-1, keepdim=True)
    carried = allowed & (logits >= top - 100)
    row_max = logits.abs().masked_fill(~carried, 0).amax(-1)  # (B, H, L)
    total = torch.zeros(q.shape[1], dtype=torch.float64)
    count = torch.zeros(q.shape[1], dtype=torch.float64)
    peak = torch.zeros(q.shape[1])
    for i, positions in enumerate(spread_rows(q.shape[0], q.shape[2])):
        for pos in positions:
            valid = keys[i, :, pos] > 1
            total += torch.where(valid, ent[i, :, pos] / torch.log(keys[i, :, pos].float()), 0)
            count += valid
            peak = torch.maximum(peak, row_max[i, :, pos])
    if causal is None:
        causal = torch.equal(allowed[0, 0], torch.ones_like(allowed[0, 0]).tril())
    key_norms = k.norm(dim=-1)  # (B, H, S)
    reach = torch.stack(
        [key_norms[..., : i + 1 if causal else None].amax(-1) for i in range(q.shape[2])], -1
    )
    picked = (q.norm(dim=-1) * reach).topk(SAMPLING.peak, dim=-1).indices  # (B, H, peak)
    return (total / count).float(), torch.maximum(peak, row_max.gather(2, picked).amax((0, 2)))


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
    # A finite fill (HF's older additive -10000, The Annotated Transformer's -1e9) gives
    # those keys no weight either: the max is the unmasked keys', not the fill's 1e4. (The
    # entropy's normalisation still counts them as keys: not compared here.)
    _, want = reference(q, k, allowed, 0.3)
    for fill in (-1e4, -1e9):
        finite = torch.zeros(3, 1, 40, 30).masked_fill(~allowed, fill)
        got = sdpa_sample(q, k, finite, False, 0.3, SAMPLING)
        np.testing.assert_allclose(got[:, 1].numpy(), want.numpy(), rtol=1e-5)


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

    import stabscope.drivers.script

    cfg = stabscope.drivers.script.ScriptConfig(
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
    import stabscope.drivers.script  # noqa: F401

    sdpa, batch, sample = gpt("sdpa")
    explicit = copy.deepcopy(sdpa)
    for block in explicit.blocks:
        block.attn.attn = "explicit"
    a = record(sdpa, tmp_path / "a", lambda m: sample.loss(m, batch))
    b = record(explicit, tmp_path / "b", lambda m: sample.loss(m, batch))
    assert len(a) == len(b) == 2 * 2 * 4  # 2 layers x 2 metrics x 4 heads
    compare_routes(a, b)
    # Written-out logits: their max is read whole, every query of every sequence.
    peak = b[b.metric == "attn_logit_max"].sort_values(["module", "index"]).value
    np.testing.assert_allclose(peak, full_peaks(explicit, batch).ravel(), rtol=1e-5)


def compare_routes(sdpa, explicit):
    """The same attention through SDPA and written out: the same entropy; the max of the
    written-out logits is the whole batch's, SDPA's a lower bound of it (from the sample and
    the likeliest queries of each sequence)."""
    key = ["module", "metric", "index"]
    merged = sdpa.merge(explicit, on=key, suffixes=("_sdpa", "_explicit"))
    ent = merged[merged.metric == "attn_entropy"]
    np.testing.assert_allclose(ent.value_sdpa, ent.value_explicit, rtol=1e-5, atol=1e-5)
    peak = merged[merged.metric == "attn_logit_max"]
    assert len(peak) == len(ent) and (peak.value_sdpa <= peak.value_explicit * (1 + 1e-5)).all()


def full_peaks(model, batch):
    """(layers, heads) max |q·k|/sqrt(d) over every causal pair of the batch, from each sample
    GPT attention's input."""
    inputs = []
    hooks = [
        b.attn.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in model.blocks
    ]
    with torch.no_grad():
        model(batch[:, :-1])
    for h in hooks:
        h.remove()
    peaks = []
    for block, x in zip(model.blocks, inputs):
        attn, (b, t, d) = block.attn, x.shape
        q, k = (p(x).view(b, t, attn.heads, -1).transpose(1, 2) for p in (attn.q, attn.k))
        logits = (q @ k.transpose(-2, -1) / math.sqrt(d // attn.heads)).abs()
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        peaks.append(logits.masked_fill(~causal, 0).amax((0, 2, 3)))
    return torch.stack(peaks).detach().numpy()


def test_zero_queries_turn_the_probe_off(tmp_path):
    """attn_queries=0 records no attention rows (not zero entropies that would read as
    collapse), and the rest of the standard preset is still there."""
    import stabscope.drivers.script

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
    # nn.MultiheadAttention's q and k are recomputed for the first 2 sequences only: the 32
    # rows are spread over those two.
    rows = torch.tensor(spread_rows(2, 20))  # (2, 16)
    w = weights[torch.arange(2)[:, None], :, rows]  # (b, r, H, S)
    ent = -(w * torch.log(w.clamp_min(1e-30))).sum(-1) / math.log(15)
    np.testing.assert_allclose(df.value, ent.mean((0, 1)).numpy(), atol=1e-5)


def sdpa_and_eager(tmp_path, model_class, config_class, **config):
    """Attention rows of an HF model from a seeded tiny config, recorded with HF's sdpa and
    eager attention, one step each, sorted alike; no probe errors in either."""
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    values = []
    for impl in ("sdpa", "eager"):
        torch.manual_seed(0)
        model = model_class(config_class(vocab_size=50, attn_implementation=impl, **config))
        df = record(model, tmp_path / impl, lambda m: m(input_ids=ids, labels=ids).loss)
        values.append(df.sort_values(["module", "metric", "index"]).reset_index(drop=True))
        assert "probe_errors" not in json.loads((tmp_path / impl / "meta.json").read_text())
    compare_routes(*values)
    return values


def test_hf_llama_sdpa_matches_eager(tmp_path):
    transformers = pytest.importorskip("transformers")
    llama = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64)
    sdpa, _ = sdpa_and_eager(
        tmp_path,
        transformers.LlamaForCausalLM,
        transformers.LlamaConfig,
        num_key_value_heads=2,
        **llama,
    )
    assert len(sdpa) == 2 * 2 * 4


def test_hf_t5_sdpa_matches_eager(tmp_path):
    """T5 passes its learned relative position bias to SDPA as the additive mask (a tensor
    that requires grad); every attention module of encoder and decoder is sampled."""
    transformers = pytest.importorskip("transformers")
    t5 = dict(num_layers=2, num_decoder_layers=2, d_model=32, d_kv=8, num_heads=4, d_ff=64)
    sdpa, eager = sdpa_and_eager(
        tmp_path,
        transformers.T5ForConditionalGeneration,
        transformers.T5Config,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        **t5,
    )
    # 2 encoder self-attentions, 2 decoder self- and 2 cross-attentions; 4 heads, 2 metrics
    assert len(sdpa) == len(eager) == 6 * 4 * 2


def test_attention_probe_leaves_outputs_unchanged(tmp_path):
    model, batch, sample = gpt("sdpa")
    twin = copy.deepcopy(model)
    with stabscope.Recorder(
        model, tmp_path, schedule=Schedule(1, 0), forward=lambda m: sample.loss(m, batch)
    ) as rec:
        out = model(batch[:, :-1])
        rec.step()
    assert torch.equal(out, twin(batch[:, :-1]))
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention


# -- how calls are seen: TorchFunctionMode first, the patched attributes once they suffice ----


def record_steps(model, run_dir, forward, steps=4, structure=None):
    """``steps`` recorded forward/backward passes with unchanged weights (no optimizer), so
    every step's attention is the same; rows per step."""
    with stabscope.Recorder(
        model, run_dir, schedule=Schedule(steps, 0), forward=forward, structure=structure
    ) as rec:
        for _ in range(steps):
            forward(model).backward()
            rec.step()
            # Outside the attention modules nothing is patched, after every step.
            assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    df = stabscope.load_run(run_dir, metrics=["attn_entropy", "attn_logit_max"])
    key = ["module", "metric", "index"]
    return [g.sort_values(key).reset_index(drop=True) for _, g in df.groupby("step")]


def watch_modes(model):
    """Per call of each attention's q projection: whether a TorchFunctionMode was active."""
    seen = []
    for block in model.blocks:
        block.attn.q.register_forward_pre_hook(
            lambda m, a: seen.append(torch._C._is_torch_function_mode_enabled())
        )
    return seen


def test_patched_attributes_take_over_and_give_the_same_values(tmp_path):
    """The sample GPT's SDPA: the first recorded forward runs in the mode (and the patch),
    later ones with the patch alone; the values are the same in every step."""
    model, batch, sample = gpt("sdpa")
    seen = watch_modes(model)
    steps = record_steps(model, tmp_path, lambda m: sample.loss(m, batch))
    # 2 layers a step: step 0 runs in the mode, steps 1-3 do not. The structure's traced
    # forward before them runs in discovery's own mode (it looks for attention calls).
    assert seen[-8:] == [True, True] + [False] * 6
    assert len(seen) == 10 and seen[:2] == [True, True]
    assert [len(s) for s in steps] == [2 * 2 * 4] * 4
    for later in steps[1:]:
        np.testing.assert_array_equal(later.value, steps[0].value)


def test_calls_the_patch_cannot_see_keep_the_mode(tmp_path, monkeypatch):
    """Explicit softmax attention, and SDPA imported by name before recording (the patched
    attribute is never looked up): every forward keeps the mode, every step is recorded, and
    the values equal those of SDPA through the attribute."""
    model, batch, sample = gpt("sdpa")
    reference = record_steps(
        copy.deepcopy(model), tmp_path / "ref", lambda m: sample.loss(m, batch)
    )
    explicit = copy.deepcopy(model)
    for block in explicit.blocks:
        block.attn.attn = "explicit"
    seen = watch_modes(explicit)
    steps = record_steps(explicit, tmp_path / "explicit", lambda m: sample.loss(m, batch))
    assert seen[-8:] == [True] * 8
    for step in steps:
        compare_routes(reference[0], step)

    import types

    by_name = types.SimpleNamespace(**vars(F))  # like `from torch.nn.functional import ...`
    monkeypatch.setattr(sample, "F", by_name)
    seen = watch_modes(model)
    steps = record_steps(model, tmp_path / "by-name", lambda m: sample.loss(m, batch))
    assert seen[-8:] == [True] * 8
    assert len(steps) == 4
    for step in steps:
        np.testing.assert_array_equal(step.value, reference[0].value)


def test_multihead_attention_is_sampled_once_per_call_on_either_route(tmp_path):
    """nn.MultiheadAttention calls F.multi_head_attention_forward, which calls SDPA inside:
    one sample per call (not two), the same in the mode's step and the patch's."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(3, 20, 16)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False, is_causal=True, attn_mask=causal)[0]

    causal = nn.Transformer.generate_square_subsequent_mask(20)
    model = nn.Sequential(Wrap(), nn.Linear(16, 16))
    from stabscope.structure import AttentionInfo, Block, Structure

    structure = Structure(
        True, [Block("0", 0, "", "unknown", 1.0, [], [AttentionInfo("0.attn", 4)])]
    )
    steps = record_steps(model, tmp_path, lambda m: m(x).pow(2).mean(), structure=structure)
    assert [len(s) for s in steps] == [2 * 4] * 4
    for later in steps[1:]:
        np.testing.assert_array_equal(later.value, steps[0].value)
    # q and k are recomputed for the first 2 sequences only
    q, k = (t[:2] for t in _mha_qk(mha, x))
    want = reference(q, k, torch.ones(20, 20, dtype=torch.bool).tril())
    got = steps[0].set_index(["metric", "index"]).value
    np.testing.assert_allclose(got["attn_entropy"].to_numpy(), want[0].numpy(), atol=1e-5)


def _mha_qk(mha, x):
    """q, k (B, H, L, E/H) of an nn.MultiheadAttention, from its packed projection."""
    e, h = mha.embed_dim, mha.num_heads
    w, b = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
    q, k = F.linear(x, w[:e], b[:e]), F.linear(x, w[e : 2 * e], b[e : 2 * e])
    split = lambda t: t.reshape(*t.shape[:2], h, e // h).transpose(1, 2)  # noqa: E731
    return split(q), split(k)


def test_a_forward_that_raises_leaves_nothing_patched(tmp_path):
    """An exception inside an attention module (after its patched SDPA call) propagates, and
    torch.nn.functional is restored at once, not only at the step's end."""
    model, batch, sample = gpt("sdpa")
    original = torch._C._nn.scaled_dot_product_attention

    def fail(module, args, output):
        raise RuntimeError("out projection failed")

    with stabscope.Recorder(model, tmp_path, schedule=Schedule(3, 0)) as rec:
        for _ in range(2):  # step 0 finds the structure, step 1 runs in the mode
            sample.loss(model, batch).backward()
            rec.step()
        handle = model.blocks[0].attn.o.register_forward_hook(fail)  # step 2: the patch
        with pytest.raises(RuntimeError, match="out projection failed"):
            sample.loss(model, batch)
        assert F.scaled_dot_product_attention is original
        handle.remove()
        sample.loss(model, batch).backward()
        rec.step()
    assert F.scaled_dot_product_attention is original
    assert F.multi_head_attention_forward.__module__ == "torch.nn.functional"
    assert set(stabscope.load_run(tmp_path, metrics="attn_entropy").step) == {1, 2}


def test_switching_the_probe_off_between_steps(tmp_path):
    """``enabled = False`` leaves a step without attention rows (and unintercepted), the rest
    of the step recorded; switched back on, the same attention is sampled as before."""
    from stabscope.probes.attention import AttentionProbe

    model, batch, sample = gpt("sdpa")
    seen = watch_modes(model)
    forward = lambda m: sample.loss(m, batch)  # noqa: E731
    with stabscope.Recorder(model, tmp_path, schedule=Schedule(3, 0), forward=forward) as rec:
        probe = next(p for p in rec.structure_probes.probes if isinstance(p, AttentionProbe))
        for enabled in (True, False, True):
            probe.enabled = enabled
            forward(model).backward()
            rec.step()
    assert seen[-6:] == [True, True, False, False, False, False]
    df = stabscope.load_run(tmp_path)
    attention = df[df.metric.astype(str).str.startswith("attn_")]
    assert set(attention.step) == {0, 2}
    assert set(df[df.metric == "res_ratio"].step) == {0, 1, 2}
    by_step = [
        g.sort_values(["module", "metric", "index"]).value.to_numpy()
        for _, g in attention.groupby("step")
    ]
    np.testing.assert_array_equal(by_step[0], by_step[1])


def test_an_error_inside_the_probe_is_reported_not_raised(tmp_path, monkeypatch):
    """A sample that fails leaves the forward running and the rest recorded; meta.json lists
    the error once with its count (2 layers x 3 steps)."""
    from stabscope.probes import attention

    def broken(*args, **kwargs):
        raise ValueError("broken sample")

    monkeypatch.setattr(attention, "sdpa_sample", broken)
    model, batch, sample = gpt("sdpa")
    forward = lambda m: sample.loss(m, batch)  # noqa: E731
    with stabscope.Recorder(model, tmp_path, schedule=Schedule(3, 0), forward=forward) as rec:
        for _ in range(3):
            forward(model).backward()
            rec.step()
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["probe_errors"] == ["ValueError: broken sample (x6)"]
    metrics = set(stabscope.load_run(tmp_path).metric.astype(str))
    assert "res_ratio" in metrics and not {m for m in metrics if m.startswith("attn_")}


# -- a user's own hooks on the attention module are not the module's computation ----------


def _user_attention_map(module, x):
    """What an attention-map visualiser computes from the module's input: its own q and k
    (through the weights, not the projection modules), a 4-D softmax and an SDPA call."""
    b, t, d = x.shape
    h = module.heads
    q, k = (
        F.linear(x, p.weight, p.bias).view(b, t, h, d // h).transpose(1, 2)
        for p in (module.q, module.k)
    )
    maps = (q @ k.transpose(-2, -1) / math.sqrt(d // h)).softmax(-1)  # (B, H, T, T)
    F.scaled_dot_product_attention(q, k, k, is_causal=True)
    return maps


@pytest.mark.parametrize("attn", ["sdpa", "explicit"])
def test_user_hooks_on_the_attention_module_are_not_sampled(tmp_path, attn):
    """Forward pre-hooks and forward hooks of the user on each attention module that run
    softmax and SDPA, registered before recording, and one registered with ``prepend=True``
    while recording: the attention rows (every call index) are those of the run without
    them, on the mode's step and the patch's (SDPA) alike."""
    model, batch, sample = gpt(attn)
    forward = lambda m: sample.loss(m, batch)  # noqa: E731
    reference = record_steps(copy.deepcopy(model), tmp_path / "ref", forward)
    maps = []
    for block in model.blocks:
        attention = block.attn
        attention.register_forward_pre_hook(lambda m, a: maps.append(_user_attention_map(m, a[0])))
        attention.register_forward_hook(lambda m, a, o: maps.append(_user_attention_map(m, a[0])))
    steps = 4
    with stabscope.Recorder(
        model, tmp_path / "hooked", schedule=Schedule(steps, 0), forward=forward
    ) as rec:
        for step in range(steps):
            forward(model).backward()
            rec.step()
            if step == 1:  # armed for step 2: registered after the recorder's own hooks
                for block in model.blocks:
                    block.attn.register_forward_hook(
                        lambda m, a, o: maps.append(_user_attention_map(m, a[0])), prepend=True
                    )
    # 2 layers x (pre + post) x (4 steps + the discovery forward), + the late hook's 2 x 2
    assert len(maps) == 2 * 2 * (steps + 1) + 2 * 2
    df = stabscope.load_run(tmp_path / "hooked", metrics=["attn_entropy", "attn_logit_max"])
    key = ["module", "call", "metric", "index"]
    got = [g.sort_values(key).reset_index(drop=True) for _, g in df.groupby("step")]
    assert len(got) == steps
    for step, rows in enumerate(got):
        want = reference[step]
        assert rows.call.unique().tolist() == [0]
        assert len(rows) == len(want) == 2 * 2 * 4
        np.testing.assert_array_equal(rows.value.to_numpy(), want.sort_values(key).value.to_numpy())


# -- the max logit beyond the sample -----------------------------------------------------


@pytest.mark.parametrize("host", [True, False])
def test_the_max_reads_the_likeliest_queries_of_every_sequence(host, monkeypatch):
    """One large logit in the last sequence, outside the entropy's rows: the max finds it (its
    query has the largest norm there), the entropy is the sample's; a NaN query there makes
    that head's max NaN. On the numba kernel and on torch's path alike."""
    from stabscope.probes.kernels import host_kernels

    if not host:
        monkeypatch.setattr(host_kernels, "AVAILABLE", False)
    q, k = qk(b=4)
    # Query 6 of sequence 3, head 1 (not an entropy row: those are 5, 10, 14, ... there),
    # along key 2: the largest logit of the batch, ~10‖k‖²/sqrt(8).
    assert 6 not in spread_rows(4, 40)[3]
    q[3, 1, 6] = 10 * k[3, 1, 2]
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    got = sdpa_sample(q, k, None, True, None, SAMPLING)
    check(got, reference(q, k, causal))
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(8)
    true_max = logits.abs().masked_fill(~causal, 0).amax((0, 2, 3))
    assert got[1, 1] == pytest.approx(true_max[1].item(), rel=1e-5)
    old = sdpa_sample(q, k, None, True, None, AttentionSampling(2, 16, peak=0))
    assert old[1, 1] < 0.5 * true_max[1]  # the sample alone misses it
    q[3, 2, 7] = float("nan")
    got = sdpa_sample(q, k, None, True, None, SAMPLING).numpy()
    assert np.isnan(got[2, 1]) and np.isfinite(np.delete(got, 2, axis=0)).all()
    assert np.isfinite(got[:, 0]).all()


def test_written_out_logits_give_their_whole_max(monkeypatch):
    """Explicit attention: the max over every allowed logit of every sequence, masked entries
    (-inf, HF's most negative value, a finite fill that leaves them no softmax weight) left
    out, a few sequences at a time; NaN shows."""
    from stabscope.probes import attention_sample

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 3, 12, 12, generator=g) * 3
    allowed = torch.rand(5, 1, 12, 12, generator=g) > 0.3
    want = logits.abs().masked_fill(~allowed, 0).amax((0, 2, 3))
    monkeypatch.setattr(attention_sample, "CHUNK", 2 * 3 * 12 * 12)  # two sequences at a time
    for never in (float("-inf"), torch.finfo(torch.float32).min, -1e9, -1e4):
        got = attention_sample.written_out_peak(logits.masked_fill(~allowed, never))
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    logits[4, 2, 0, 0] = float("nan")
    got = attention_sample.written_out_peak(logits).numpy()
    assert np.isnan(got[2]) and np.isfinite(got[:2]).all()


def test_the_entropy_reads_every_sequence():
    """Uniform attention in sequences 0-1 (entropy 1), attention on one key in 2-3 (entropy
    ~0): the recorded entropy is the batch's mean, ~0.5, not the first sequences' 1."""
    q, k = qk(b=4)
    q[:2] = 0  # every logit 0: uniform
    q[2:] = 1e3 * k[2:, :, :1]  # each query's logit with key 0 dwarfs the others
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    got = sdpa_sample(q, k, None, True, None, SAMPLING)
    check(got, reference(q, k, causal))
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(8)
    p = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    ent = torch.special.entr(p).sum(-1)[:, :, 1:] / torch.log(torch.arange(2, 41.0))
    np.testing.assert_allclose(got[:, 0].numpy(), ent.mean((0, 2)).numpy(), atol=0.02)
    assert (got[:, 0] < 0.6).all()
