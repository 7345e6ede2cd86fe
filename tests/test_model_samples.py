"""A policy trained by REINFORCE draws its actions from its own outputs
(``Categorical(logits=policy(x)).sample()``): its loss, −log π(a)·A plus an entropy bonus, is
a surrogate that rises as the policy sharpens while the return climbs to its maximum. The
script's own returns are the reference: the policy learned, and ``loss-divergence`` says
why the rising loss is not an error. A classifier that samples from its outputs only under
``no_grad`` (generations for a look) is a supervised run as before."""

from __future__ import annotations

import json

import pytest
import torch

from stabscope.record import model_samples
from stabscope.record.config import RecorderConfig
from stabscope.rules import check_run
from stabscope.store.run_meta import load_meta
from tests.scripts.harness import run_both

HEAD = """
import json, sys
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
opt = torch.optim.Adam(model.parameters(), lr=0.02)
g = torch.Generator().manual_seed(1)
log = []
"""

REINFORCE = (
    HEAD
    + """
for step in range(200):
    ctx = torch.randn(64, 4, generator=g)
    dist = torch.distributions.Categorical(logits=model(ctx))
    action = dist.sample()
    reward = (action == ctx[:, :3].argmax(1)).float()
    advantage = reward - reward.mean()
    loss = -(dist.log_prob(action) * advantage).mean() - 0.05 * dist.entropy().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    log.append(reward.mean().item())  # the return
json.dump(log, open(sys.argv[1], "w"))
"""
)

CLASSIFIER = (
    HEAD
    + """
for step in range(40):
    x = torch.randn(64, 4, generator=g)
    loss = nn.functional.cross_entropy(model(x), x[:, :3].argmax(1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():  # a look at what it predicts: draws from a tensor without grad
        torch.multinomial(model(x).softmax(-1), 1)
    log.append(loss.item())
json.dump(log, open(sys.argv[1], "w"))
"""
)


@pytest.mark.slow
def test_a_policy_gradients_rising_surrogate_is_not_a_divergence(tmp_path):
    sampler = torch.distributions.Categorical.sample
    plain_log, profiled_log, run = run_both(tmp_path, REINFORCE, RecorderConfig())
    returns = json.loads(profiled_log.read_text())
    assert returns == json.loads(plain_log.read_text())  # training unchanged, to the bit
    assert sum(returns[-20:]) / 20 > sum(returns[:20]) / 20 + 0.3  # the policy learned
    assert load_meta(run).doc["samples_model"] == {"function": "Categorical", "step": 0}
    (f,) = [f for f in check_run(run).findings if f.rule == "loss-divergence"]
    assert f.severity == "warning" and "draws from its model's own outputs" in f.message
    live = load_meta(run).doc["online"]["findings"]  # the verdicts while it trained
    assert not [e for e in live if e["rule"] == "loss-divergence" and e["severity"] == "error"]
    assert torch.distributions.Categorical.sample is sampler  # given back at close


def test_sampling_under_no_grad_is_not_a_policy(tmp_path):
    _, _, run = run_both(tmp_path, CLASSIFIER, RecorderConfig(online_rules=False))
    assert "samples_model" not in load_meta(run).doc
    assert not model_samples._originals  # nothing left wrapped


def test_profile_prints_each_note_once(tmp_path):
    """The run's notes are printed by its summary; the driver's own notes that meta.json also
    holds (the loss not replayed: its sampled actions differ at each replay) are not again."""
    from tests.test_cli import invoke

    script = tmp_path / "reinforce.py"
    script.write_text(REINFORCE)
    res = invoke("profile", script, "--out", tmp_path / "run", "--", tmp_path / "log.json")
    assert res.exit_code == 0, res.output
    notes = [line for line in res.stderr.splitlines() if line.startswith("note:")]
    assert notes and len(notes) == len(set(notes))
    assert sum("not replayed" in n for n in notes) == 1


def test_torch_functions_stay_torchs_own_while_a_run_is_open(tmp_path):
    """TorchScript compiles calls to torch's built-in functions only: a function that draws
    with ``torch.bernoulli`` scripts while a Recorder is open (the watch wraps the
    distributions' ``sample`` methods, not torch's functions), and draws what it does after."""
    import stabscope

    model = torch.nn.Linear(2, 2)
    with stabscope.Recorder(model, tmp_path / "run"):

        def keep(x: torch.Tensor) -> torch.Tensor:
            return x * torch.bernoulli(torch.full_like(x, 0.5))

        scripted = torch.jit.script(keep)
        torch.manual_seed(0)
        inside = scripted(torch.ones(8))
    torch.manual_seed(0)
    assert torch.equal(inside, keep(torch.ones(8)))
