"""The extra forward passes stabscope runs on the user's model (structure discovery, the
model-update probe, the theory's description) leave the training exactly as it was: every
submodule's own mode, the RNG streams and the buffers."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from torch import nn

import stabscope
from stabscope import Schedule
from stabscope.drivers.describe_model import write_run_prediction
from stabscope.record.side_forward import side_forward
from stabscope.structure import discover

STEPS = 4


class RunningScale(nn.Module):
    """Divides by a running mean of |x| that it updates on every call, in any mode: a custom
    buffer that an extra forward would move."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.scale.mul_(0.9).add_(0.1 * x.abs().mean())
        return x / self.scale


class Stem(nn.Module):
    """(B, T, D) -> (B, T, D): a BatchNorm the user froze, a live dropout, a running scale."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(width)
        self.drop = nn.Dropout(0.2)
        self.scale = RunningScale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(self.drop(self.bn(x.transpose(1, 2)).transpose(1, 2)))


def model_and_data():
    """The sample GPT with a stem after its token embedding: BatchNorm frozen (``eval()``,
    running statistics from a few batches), dropout on; block 0's feed-forward has a dropout
    the user switched off. Same weights and batches on every call."""
    import gpt as sample

    from stabscope.drivers.script import ScriptConfig

    cfg = ScriptConfig(sample.CONFIG | {"depth": 2, "width": 32, "seq_len": 16, "batch_size": 8})
    torch.manual_seed(0)
    model = sample.model(cfg)
    model.tok = nn.Sequential(model.tok, Stem(cfg.width))
    model.blocks[0].mlp.act = nn.Sequential(nn.GELU(), nn.Dropout(0.5))
    data = sample.batches(cfg)
    batches = [next(data) for _ in range(STEPS + 3)]
    with torch.no_grad():
        for batch in batches[STEPS:]:  # the frozen BatchNorm's statistics: not 0 and 1
            model(batch[:, :-1])
    model.tok[1].bn.eval()
    model.blocks[0].mlp.act[1].eval()
    return model, batches[:STEPS], sample


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def train(tmp_path, recorded: bool) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Losses of STEPS Adam steps and the final buffers; with ``recorded``, under a full-preset
    Recorder given ``forward=`` (structure discovery, the model update every step) and after
    the theory's prediction, as ``stabscope profile`` runs them."""
    model, batches, sample = model_and_data()
    before = modes(model)
    assert not before["tok.1.bn"] and before["tok.1.drop"] and not before["blocks.0.mlp.act.1"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(1)  # the dropout masks' stream
    rec = None
    if recorded:
        forward = lambda m: sample.loss(m, batches[0])  # noqa: E731
        structure = discover(model, forward)
        assert structure.recognised and modes(model) == before
        rec = stabscope.Recorder(
            model,
            tmp_path,
            preset="full",
            schedule=Schedule(dense=STEPS),
            forward=forward,
            structure=structure,
        )
        assert write_run_prediction(model, structure, forward, tmp_path) is None
        assert (tmp_path / "prediction.json").exists()  # the description's forwards ran
        assert modes(model) == before
        rec.start()  # the model update's reference forward
    losses = []
    for batch in batches:
        loss = sample.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rec is not None:
            rec.step(loss=loss)
        losses.append(loss.detach())
        assert modes(model) == before  # after every step, every submodule's own mode
    if rec is not None:
        rec.close()
        metrics = set(stabscope.load_run(tmp_path).metric.astype(str))
        assert {"model_update", "res_ratio", "attn_entropy"} <= metrics
    return losses, {name: b.clone() for name, b in model.named_buffers()}


def test_recorder_with_a_probe_forward_leaves_training_bit_identical(tmp_path):
    plain, plain_buffers = train(tmp_path / "plain", recorded=False)
    recorded, recorded_buffers = train(tmp_path / "recorded", recorded=True)
    for step, (a, b) in enumerate(zip(plain, recorded)):
        assert torch.equal(a, b), f"step {step}: {a.item()} != {b.item()}"
    assert plain_buffers.keys() == recorded_buffers.keys()
    for name, value in plain_buffers.items():
        assert torch.equal(value, recorded_buffers[name]), name


def test_side_forward_gives_everything_back():
    """Modes set directly (a ``train()`` override is not run), RNG streams of torch, Python
    and numpy, and buffers changed in place or replaced."""
    calls = []

    class Merging(nn.Linear):  # merges something on eval(), like loralib's LoRA layers
        def train(self, mode: bool = True):
            calls.append(mode)
            return super().train(mode)

    model = nn.Sequential(nn.BatchNorm1d(4), Merging(4, 4), nn.Dropout(0.5), RunningScale())
    model[0].eval()
    model[2].eval()
    model[0].running_mean += 1.0
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    old_scale = model[3].scale
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    with side_forward(model):
        assert not any(m.training for m in model.modules())
        model(torch.randn(5, 4))
        random.random(), np.random.rand()
        model[3].scale = torch.zeros(())  # replaced, not changed in place
        model[0].running_var.mul_(2)
    assert calls == []
    assert [m.training for m in model] == [False, True, False, True]
    after = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]
    assert model[3].scale is old_scale
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name


def test_side_forward_gives_back_generators_held_or_handed_over():
    """torch, numpy and Python generator objects, held by a module or among the pass's
    inputs: each draws after the pass what it would have drawn without it."""
    model = nn.Linear(4, 4)
    model.noise = torch.Generator().manual_seed(0)  # held by the module
    model.np_rng = np.random.default_rng(1)
    handed = (torch.Generator().manual_seed(2), random.Random(3), np.random.RandomState(4))
    untouched = torch.Generator().manual_seed(5)  # neither: the pass is not told of it

    def draw(gens) -> list:
        """One draw of each: (module's torch, module's numpy, handed torch, handed Python,
        handed RandomState, the untold torch)."""
        t, n, h, r, s, u = gens
        rand = torch.rand
        return [rand(2, generator=t), n.random(2), rand(2, generator=h), r.random(), s.rand(2),
                rand(2, generator=u)]  # fmt: skip

    def clone(g):
        if isinstance(g, torch.Generator):
            return torch.Generator().set_state(g.get_state())
        return copy.deepcopy(g)

    gens = (model.noise, model.np_rng, *handed, untouched)
    expected = draw(tuple(clone(g) for g in gens))
    with side_forward(model, inputs=({"gen": list(handed)},)):
        draw(gens)
    after = draw(gens)
    for a, b in zip(after[:5], expected[:5]):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not torch.equal(after[5], expected[5])  # the one it was not told of moved


def test_side_forward_restores_after_an_exception():
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Dropout(0.5))
    model[0].eval()
    with pytest.raises(RuntimeError, match="boom"), side_forward(model):
        model(torch.randn(5, 4))
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == [True, False, True]


SCRIPT = """
import torch
from torch import nn

def model(cfg):
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    net[1].eval()  # frozen: running statistics as built
    return net

def batches(cfg):
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.randn(16, 4, generator=g)

def loss(model, x):
    return model(x).pow(2).mean()
"""


def test_profile_keeps_a_model_scripts_frozen_submodules(tmp_path):
    """``stabscope profile`` trains the model as built: a BatchNorm the script froze stays
    frozen (its forward is an eval-mode pass, its running statistics unchanged), the rest
    trains."""
    from stabscope.drivers.profile import profile_script
    from stabscope.drivers.script import load_script
    from stabscope.record.config import RecorderConfig

    path = tmp_path / "frozen.py"
    path.write_text(SCRIPT)
    run = profile_script(load_script(path), tmp_path / "run", 3, RecorderConfig(), device="cpu")
    df = stabscope.load_run(run.run_dir, metrics=["act_rms"])
    phases = df.groupby(df.module.astype(str)).phase.agg(lambda p: set(p.astype(str)))
    assert phases["1"] == {"eval"} and phases["0"] == phases["3"] == {"train"}


MASKED = """
import json, sys
import torch
from torch import nn

class Masked(nn.Module):
    '''Drops a random half of its input features each call, drawn from a generator it is
    handed (``gen``) and, for its noise, from one it holds: a masked autoencoder's ways.'''

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
        self.noise = torch.Generator().manual_seed(5)

    def forward(self, x, gen):
        keep = (torch.rand(x.shape, generator=gen) > 0.5).float()
        return self.body(x * keep + 0.01 * torch.randn(x.shape, generator=self.noise))

torch.manual_seed(0)
model = Masked()
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
gen = torch.Generator().manual_seed(1)
jitter = torch.Generator().manual_seed(2)  # the loss's own noise, drawn around the output
x = torch.randn(32, 8)
losses = []
for step in range(12):
    out = model(x, gen)
    if sys.argv[2] == "jitter":
        out = torch.normal(out, 0.01, generator=jitter)
    loss = (out - x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
json.dump(losses, open(sys.argv[1], "w"))
"""


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["plain", "jitter"])
def test_the_generators_a_model_is_handed_or_holds_are_given_back(tmp_path, loss):
    """The stability index replays the model's first training call at steps 2, 4, 8, on its
    arguments: a generator among them, or held by a module, drew the replay's mask, and
    every later step's mask moved (a masked autoencoder's losses differed from step 3 on).
    The loss computed outside the model is replayed once, to check it: the generator of its
    noise must not move either. The reference is the script run without stabscope."""
    import json
    import subprocess
    import sys

    from stabscope.drivers.zerocode import profile_training_script
    from stabscope.record.config import RecorderConfig

    script = tmp_path / "masked.py"
    script.write_text(MASKED)
    plain, profiled = tmp_path / "plain.json", tmp_path / "profiled.json"
    subprocess.run([sys.executable, str(script), str(plain), loss], check=True)
    out = tmp_path / "run"
    profile_training_script(script, [str(profiled), loss], out, RecorderConfig(online_rules=False))
    assert json.loads(profiled.read_text()) == json.loads(plain.read_text())
    meta = stabscope.read_meta(out)
    if loss == "plain":  # the replays ran: steps 2, 4 and 8
        assert meta["stability_index"]["measured"] == 3, meta["stability_index"]
    else:  # a random loss: its replay (one, to check it) differs from the script's
        assert any("loss computed outside the model is not replayed" in n for n in meta["notes"])
