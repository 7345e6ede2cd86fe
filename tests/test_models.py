"""Real models with the awkward cases: shared modules, in-place ops, kwargs and tuple outputs,
nn.TransformerEncoder both ways, an HF GPT-2 from a tiny config, a CNN."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import stabscope
from stabscope import Schedule
from stabscope.analysis.summary import summarize
from tests.scripts.harness import rms


def record_one_step(model, run_dir, forward, **kw):
    """One recorded training step; ``forward(model)`` returns the loss."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with stabscope.Recorder(model, run_dir, schedule=Schedule(dense=1, every=0), **kw) as rec:
        loss = forward(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.step(loss=loss)
    return stabscope.load_run(run_dir), stabscope.read_meta(run_dir)


def value(df, module, metric, call=0, phase="train"):
    sel = df[
        (df.module == module) & (df.metric == metric) & (df.call == call) & (df.phase == phase)
    ]
    assert len(sel) == 1, (module, metric, call, len(sel))
    return float(sel.value.iloc[0])


class SharedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)

    def forward(self, x):
        a = self.shared(x)
        b = self.shared(torch.relu(a))
        return a, b


def test_module_used_twice_gets_call_index(run_dir):
    torch.manual_seed(0)
    model = SharedTwice()
    x = torch.randn(3, 4)
    df, _ = record_one_step(model, run_dir, lambda m: sum(o.pow(2).sum() for o in m(x)))
    torch.manual_seed(0)
    ref = SharedTwice()  # same init as `model` before its SGD step
    xa = ref.shared(x)
    xa.retain_grad()
    xb = ref.shared(torch.relu(xa))
    xb.retain_grad()
    (xa.pow(2).sum() + xb.pow(2).sum()).backward()
    for call, t in enumerate((xa, xb)):
        assert value(df, "shared", "act_rms", call) == pytest.approx(
            t.detach().pow(2).mean().sqrt().item(), rel=1e-5
        )
        # Gradient w.r.t. each call's own output, not the sum over calls.
        assert value(df, "shared", "grad_rms", call) == pytest.approx(
            t.grad.pow(2).mean().sqrt().item(), rel=1e-5
        )


def test_inplace_relu_on_3d_linear_is_reported_not_trusted(run_dir):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 2))
    x = torch.randn(2, 5, 4)  # 3-D input: Linear's output is a view, then modified in place
    df, meta = record_one_step(model, run_dir, lambda m: m(x).pow(2).mean())
    assert "0" in meta["hooks_never_fired"]["grad"]
    assert df[(df.module == "0") & (df.metric == "grad_rms")].empty
    # The summary names the module and why a gradient hook can stay silent.
    from rich.console import Console

    from stabscope.report.console import print_summary

    console = Console(record=True, width=200)
    print_summary(summarize(run_dir), console)
    assert (
        "grad hooks never fired (no gradient w.r.t. their outputs: unused by the loss, "
        "changed in place, or taken with torch.autograd.grad, whose gradients are not "
        "recorded): 0" in console.export_text()
    )
    # The forward statistic is taken before the in-place ReLU and is still right.
    torch.manual_seed(0)
    ref = nn.Linear(4, 8)
    assert value(df, "0", "act_rms") == pytest.approx(ref(x).pow(2).mean().sqrt().item(), rel=1e-5)


def test_inplace_relu_on_2d_linear_gradient_is_right(run_dir):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 2))
    x = torch.randn(6, 4)
    df, meta = record_one_step(model, run_dir, lambda m: m(x).pow(2).mean())
    torch.manual_seed(0)
    l0, l2 = nn.Linear(4, 8), nn.Linear(8, 2)
    h = l0(x)
    h.retain_grad()
    l2(torch.relu(h)).pow(2).mean().backward()
    assert meta["hooks_never_fired"]["grad"] == []
    assert value(df, "0", "grad_rms") == pytest.approx(h.grad.pow(2).mean().sqrt().item(), rel=1e-5)


@dataclasses.dataclass
class Out:
    hidden: torch.Tensor
    extra: int


class KwargsModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 2)

    def forward(self, *, inputs, scale=1.0):
        h = self.enc(inputs) * scale
        return {"logits": self.dec(h), "hidden": (h, None)}, Out(h, 3)


def test_kwargs_dict_tuple_and_dataclass_outputs(run_dir):
    torch.manual_seed(0)
    model = KwargsModel()
    x = torch.randn(3, 4)
    df, meta = record_one_step(
        model, run_dir, lambda m: m(inputs=x, scale=2.0)[0]["logits"].pow(2).sum()
    )
    with torch.no_grad():
        torch.manual_seed(0)
        ref = KwargsModel()
        logits = ref(inputs=x, scale=2.0)[0]["logits"]
    # The root's primary tensor is the first tensor inside the nested output.
    assert value(df, "<root>", "act_rms") == pytest.approx(
        logits.pow(2).mean().sqrt().item(), rel=1e-5
    )
    assert meta["hooks_never_fired"]["forward"] == []


class TiedEmbedding(nn.Module):
    """HF T5's layout: ``shared`` is never called; ``embed`` holds the same weight and runs.
    ``spare`` has weights of its own and is never called either."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(10, 8)
        self.embed = nn.Embedding(10, 8)
        self.embed.weight = self.shared.weight
        self.head = nn.Linear(8, 3)
        self.spare = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def test_a_module_whose_tied_weights_ran_elsewhere_is_not_said_never_to_fire(run_dir):
    torch.manual_seed(0)
    model = TiedEmbedding()
    assert model.shared.weight is model.embed.weight
    ids = torch.randint(0, 10, (4, 5))
    _, meta = record_one_step(model, run_dir, lambda m: m(ids).pow(2).mean())
    assert meta["hooks_never_fired"]["forward"] == ["spare"]


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_both_norm_placements(run_dir, norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first
    )
    model = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
    x = torch.randn(2, 5, 16)
    df, meta = record_one_step(model, run_dir, lambda m: m(x).pow(2).mean())
    with torch.no_grad():
        torch.manual_seed(0)
        ref_layer = nn.TransformerEncoderLayer(
            16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        ref = nn.TransformerEncoder(ref_layer, 3, enable_nested_tensor=False)
        h = x
        for i in range(3):
            h = ref.layers[i](h)
            assert value(df, f"layers.{i}", "act_rms") == pytest.approx(
                h.pow(2).mean().sqrt().item(), rel=1e-5
            )
    assert value(df, "layers.2.linear2", "grad_rms") > 0
    # MultiheadAttention computes with out_proj's weights directly: its hooks never fire.
    # The run says so; the summary leaves out what holds for every such model.
    assert "layers.0.self_attn.out_proj" in meta["hooks_never_fired"]["forward"]
    assert summarize(run_dir).never_fired["forward"] == []
    # Post-LN normalises the block output; Pre-LN leaves the residual stream unnormalised.
    out_rms = value(df, "layers.2", "act_rms")
    assert out_rms == pytest.approx(1.0, abs=0.01) if not norm_first else out_rms > 1.0


def test_hf_gpt2_from_tiny_config(run_dir):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=50,
        n_positions=16,
        attn_pdrop=0.0,
        embd_pdrop=0.0,
        resid_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 50, (2, 8))
    df, _ = record_one_step(model, run_dir, lambda m: m(input_ids=ids, labels=ids).loss)
    modules = set(df.module.astype(str))
    assert {"transformer.h.0", "transformer.h.1.mlp.c_fc", "lm_head"} <= modules
    with torch.no_grad():
        torch.manual_seed(0)
        ref = transformers.GPT2LMHeadModel(config)
        logits = ref(input_ids=ids).logits
    assert value(df, "lm_head", "act_rms") == pytest.approx(
        logits.pow(2).mean().sqrt().item(), rel=1e-4
    )
    assert value(df, "transformer.h.1", "grad_rms") > 0
    # Root output is a ModelOutput whose first tensor is the loss.
    assert value(df, "<root>", "act_rms") == pytest.approx(
        df[(df.module == "__run__") & (df.metric == "loss")].value.item(), rel=1e-6
    )


def test_cnn_with_batchnorm(run_dir):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    x = torch.randn(4, 3, 8, 8)
    df, _ = record_one_step(model, run_dir, lambda m: m(x).pow(2).mean())
    # Training-mode BatchNorm output has per-channel mean 0 and variance ~1: rms ~1.
    assert value(df, "1", "act_rms") == pytest.approx(1.0, abs=1e-3)
    assert abs(value(df, "1", "act_mean")) < 1e-5


def test_a_gradient_penalty_is_not_recorded_as_the_losss_gradient(run_dir):
    """WGAN-GP: the critic's output at interpolated points goes through torch.autograd.grad
    (grad_outputs of ones) for the penalty, not into the loss. The gradients recorded for the
    critic's head, per call and every step, are those of the loss alone."""
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(32, 2, generator=g) + 2, torch.randn(32, 2, generator=g)
    seen: list[torch.Tensor] = []  # the loss's gradient w.r.t. the head's output, per call
    with stabscope.Recorder(critic, run_dir, schedule=Schedule(dense=1, every=0)) as rec:
        for _ in range(3):
            outs = [critic(real), critic(fake)]
            for out in outs:
                out.register_hook(seen.append)
            mix = torch.rand(32, 1, generator=g)
            interp = (mix * real + (1 - mix) * fake).requires_grad_(True)
            score = critic(interp)
            (slope,) = torch.autograd.grad(score, interp, torch.ones_like(score), create_graph=True)
            penalty = (slope.norm(dim=1) - 1).pow(2).mean()
            loss = outs[1].mean() - outs[0].mean() + 10 * penalty
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)

    df = stabscope.load_run(run_dir)
    grads = df[(df.module == "2") & (df.metric == "grad_rms") & (df.step == 0)]
    assert sorted(grads.call.tolist()) == [0, 1]  # the interpolated call has no loss gradient
    assert sorted(grads.value) == pytest.approx(sorted(rms(t) for t in seen[:2]), rel=1e-6)
    flight = df[(df.module == "2") & (df.metric == "flight_grad_rms")].sort_values("step")
    pooled = [torch.cat([seen[2 * s], seen[2 * s + 1]]) for s in flight.step]
    assert flight.value.tolist() == pytest.approx([rms(t) for t in pooled], rel=1e-6)
