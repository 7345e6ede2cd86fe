"""The hook pitfalls of docs/architecture.md, each met by a real script run unmodified: in-place
ops on views, a module used twice, activation checkpointing (both variants), and the fused fast
path of ``nn.TransformerEncoderLayer`` in eval passes. Values are checked against gradients and
activations computed here by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stabscope
from stabscope.record.config import RecorderConfig
from stabscope.record.schedule import Schedule
from tests.scripts import train_forward_direct, train_mlp, train_shared, train_transformer
from tests.scripts.harness import plain, record, rms, values


def test_in_place_relu_on_views_trains_and_reports_the_hooks_that_cannot_fire(tmp_path):
    run, log = record(tmp_path, "train_mlp.py", "--steps", "3")
    assert log == plain(tmp_path, "train_mlp.py", "--steps", "3")  # no crash, no change
    never = stabscope.read_meta(run)["hooks_never_fired"]["grad"]
    # fc1 and fc2 return 3-D views that the next in-place ReLU overwrites: their tensor
    # hooks cannot fire, and are listed instead of silently missing.
    assert {"fc1", "fc2"} <= set(never)
    model, teacher = train_mlp.make_model()
    x = train_mlp.batch(0)
    out = model(x)
    out.retain_grad()
    nn.functional.mse_loss(out, teacher(x)).backward()
    assert values(run, "head", "grad_rms").value[0] == pytest.approx(rms(out.grad), rel=1e-5)


def shared_reference(reentrant: bool) -> dict[str, list[float]]:
    """Step 0 of train_shared by hand: both calls of `shared`, and the checkpointed block."""
    model = train_shared.make_model(reentrant)
    x, y = train_shared.batch(0)
    first = model.shared(model.embed(x))
    inner = model.block[0](first)
    second = model.shared(first + model.block[2](model.block[1](inner)))
    for t in (first, second, inner):
        t.retain_grad()
    nn.functional.mse_loss(model.head(second), y).backward()
    return {
        "act": [rms(first), rms(second)],
        "grad": [rms(first.grad), rms(second.grad)],
        "block_act": [rms(inner)],
        "block_grad": [rms(inner.grad)],
    }


@pytest.mark.parametrize("reentrant", [False, True])
def test_shared_module_and_checkpointed_block(tmp_path, reentrant):
    flags = ["--reentrant"] if reentrant else []
    run, log = record(tmp_path, "train_shared.py", "--steps", "3", *flags)
    ref = shared_reference(reentrant)
    act, grad = values(run, "shared", "act_rms"), values(run, "shared", "grad_rms")
    # One module, two calls per step: each call has its own statistics.
    assert act.call.tolist() == [0, 1] * 3
    assert act.value[:2].tolist() == pytest.approx(ref["act"], rel=1e-5)
    assert grad.value[:2].tolist() == pytest.approx(ref["grad"], rel=1e-5)
    # The loss is found although reentrant checkpointing calls backward inside backward.
    assert values(run, "__run__", "loss").value.tolist() == pytest.approx(
        [r["loss"] for r in log], rel=1e-6
    )
    modules = {m["name"]: m for m in stabscope.read_meta(run)["modules"]}
    assert modules["block.0"]["forward_calls"] == 3  # recomputation in backward not counted
    block = values(run, "block.0", "act_rms", phase="eval" if reentrant else "train")
    assert block.value[:1].tolist() == pytest.approx(ref["block_act"], rel=1e-5)
    if reentrant:
        # The reentrant variant runs the block's forward under no_grad: its statistics land
        # in phase eval, without gradients (docs/zero-code.md).
        assert values(run, "block.0", "act_rms").empty
        assert values(run, "block.0", "grad_rms", phase="eval").empty
    else:
        block_grad = values(run, "block.0", "grad_rms")
        assert block_grad.value[:1].tolist() == pytest.approx(ref["block_grad"], rel=1e-5)


def linear1_rms(step: int) -> tuple[float, float]:
    """encoder.layers.0.linear1's output rms at ``step``: training forward, then eval pass."""
    model = train_transformer.make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    seen: list[float] = []
    model.encoder.layers[0].linear1.register_forward_hook(lambda m, a, o: seen.append(rms(o)))
    for s in range(step + 1):
        loss = train_transformer.lm_loss(model, train_transformer.batch(s))
        opt.zero_grad()
        loss.backward()
        opt.step()
        train_rms = seen[-1]
        model.eval()
        with torch.no_grad():  # a hook on a submodule disables the fused path here too
            train_transformer.lm_loss(model, train_transformer.batch(1000 + s))
        model.train()
    return train_rms, seen[-1]


@pytest.mark.slow
def test_transformer_encoder_eval_fast_path_is_kept_apart(tmp_path):
    config = RecorderConfig(schedule=Schedule(dense=2, every=3))
    run, log = record(tmp_path, "train_transformer.py", "--steps", "4", config=config)
    plain_log = plain(tmp_path, "train_transformer.py", "--steps", "4")
    assert [r["loss"] for r in log] == [r["loss"] for r in plain_log]
    assert [r["eval_loss"] for r in log] == pytest.approx([r["eval_loss"] for r in plain_log])
    meta = stabscope.read_meta(run)
    blocks = meta["structure"]["blocks"]
    assert [b["name"] for b in blocks] == ["encoder.layers.0", "encoder.layers.1"]
    assert {br["placement"] for b in blocks for br in b["branches"]} == {"post"}
    # MultiheadAttention never calls out_proj: listed, not trusted.
    assert "encoder.layers.0.self_attn.out_proj" in meta["hooks_never_fired"]["forward"]
    train = values(run, "encoder.layers.0.linear1", "act_rms")
    evals = values(run, "encoder.layers.0.linear1", "act_rms", phase="eval")
    assert train.step.tolist() == [0, 1, 3]
    # Recorded steps carry per-module hooks, which turn the fused eval path off: the eval
    # pass after step k is seen module by module, in step k + 1, apart from training.
    assert evals.step.tolist() == [1, 3]
    train_ref, eval_ref = linear1_rms(0)
    assert train.value[0] == pytest.approx(train_ref, rel=1e-5)
    assert evals.value[0] == pytest.approx(eval_ref, rel=1e-5)


def test_model_called_through_forward_is_found_whole(tmp_path):
    """`model.forward(x)` skips the model's own hooks; the model is still the one recorded,
    with its own names, not its first child (whose parameters would read `weight`, `bias`)."""
    run, log = record(tmp_path, "train_forward_direct.py", "--steps", "2")
    assert log == plain(tmp_path, "train_forward_direct.py", "--steps", "2")
    meta = stabscope.read_meta(run)
    assert meta["run"]["model"] == "Net"
    assert {p["name"] for p in meta["parameters"]} == {
        f"{m}.{k}" for m in ("embed", "body.0", "head") for k in ("weight", "bias")
    }
    model = train_forward_direct.make_model()
    x, y = train_forward_direct.batch(0)
    h = model.body(model.embed(x))
    h.retain_grad()
    nn.functional.mse_loss(model.head(h), y).backward()
    assert values(run, "body", "act_rms").value[0] == pytest.approx(rms(h), rel=1e-5)
    assert values(run, "body", "grad_rms").value[0] == pytest.approx(rms(h.grad), rel=1e-5)
    norm = values(run, "embed.weight", "param_grad_norm").value[0]
    assert norm == pytest.approx(model.embed.weight.grad.double().norm().item(), rel=1e-5)
