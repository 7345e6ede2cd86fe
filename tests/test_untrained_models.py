"""A model the script calls and never trains (rule ``no-update``, meta.json's
``untrained_models``): a GAN whose generator's optimizer was built over the discriminator's
parameters. The generator's gradients build up step after step and nothing applies them;
the reference is the generator's own size, and its weights, which the script checks did not
move. Its healthy twin, and a teacher called in eval mode with gradients on, are not errors."""

from __future__ import annotations

import json
import textwrap

import pytest

from stabscope.drivers.zerocode import profile_training_script
from stabscope.record.config import RecorderConfig
from stabscope.rules import check_run
from stabscope.store.run_meta import load_meta

SCRIPT = """
import json, sys
import torch
from torch import nn

def main():
    torch.manual_seed(0)
    variant = sys.argv[1]
    G = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))
    D = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 1))
    if variant == "teacher":
        G.eval()  # a fixed network the loss runs through, called with gradients on
    if variant == "early_call":  # a first call before any optimizer holds D (a shape check)
        assert D(torch.randn(2, 2)).shape == (2, 1)
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3)
    trained_by_g = G if variant in ("healthy", "early_call") else D
    opt_g = torch.optim.Adam(trained_by_g.parameters(), lr=1e-3)
    bce = nn.BCEWithLogitsLoss()
    start = [p.detach().clone() for p in G.parameters()]
    for step in range(12):
        z, real = torch.randn(64, 4), torch.randn(64, 2) + 2.0
        if variant == "d_first":  # the discriminator called first: it is the recorded model
            d_real = D(real)
            fake = G(z).detach()
        else:
            fake = G(z).detach()
            d_real = D(real)
        d_loss = bce(d_real, torch.ones(64, 1)) + bce(D(fake), torch.zeros(64, 1))
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        g_loss = bce(D(G(z)), torch.ones(64, 1))
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()
    moved = any(not torch.equal(a, b) for a, b in zip(start, G.parameters()))
    numel = sum(p.numel() for p in G.parameters())
    json.dump({"moved": moved, "numel": numel}, open(sys.argv[2], "w"))


main()  # its optimizers are freed when it returns, before the run closes
"""


def untrained_findings(run) -> list:
    return [
        f for f in check_run(run).findings if f.rule == "no-update" and "never trains" in f.message
    ]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["wrong_params", "d_first", "teacher", "healthy", "early_call"])
def test_a_generator_no_optimizer_holds(tmp_path, variant):
    script = tmp_path / "gan.py"
    script.write_text(textwrap.dedent(SCRIPT))
    out, log = tmp_path / "run", tmp_path / "log.json"
    profile_training_script(script, [variant, str(log)], out, RecorderConfig(online_rules=False))
    seen = json.loads(log.read_text())
    found = untrained_findings(out)
    listed = load_meta(out).doc.get("untrained_models")
    if variant in ("healthy", "early_call"):
        assert seen["moved"] and found == [] and listed is None
        return
    assert not seen["moved"]  # the script's own check: the generator never changed
    (entry,) = listed
    assert entry["class"] == "Sequential" and entry["training"] == (variant != "teacher")
    assert entry["with_grad"] == entry["trainable"] == seen["numel"] == 4 * 32 + 32 + 32 * 2 + 2
    (f,) = found
    assert f.severity == ("warning" if variant == "teacher" else "error")
    assert f"{seen['numel']:,} trainable values that got gradients" in f.message


SPECTRAL = """
import sys
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), spectral_norm(nn.Linear(16, 16)), nn.ReLU(),
                      nn.Linear(16, 2))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
start = model[2].parametrizations.weight.original.detach().clone()
for step in range(8):
    x = torch.randn(32, 8)
    loss = nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long())
    opt.zero_grad()
    loss.backward()
    opt.step()
assert not torch.equal(start, model[2].parametrizations.weight.original)
"""


def test_a_spectral_norms_parametrization_is_part_of_the_model(tmp_path):
    """spectral_norm calls its parametrization once when it is registered, before any
    optimizer exists: a call of its own, of a module whose only parameter (the weight it
    norms) is the model's, which Adam trains (the script checks it moved). Not a model that
    never trains."""
    script = tmp_path / "sn.py"
    script.write_text(textwrap.dedent(SPECTRAL))
    out = tmp_path / "run"
    profile_training_script(script, [], out, RecorderConfig(online_rules=False))
    assert load_meta(out).doc.get("untrained_models") is None
    assert untrained_findings(out) == []
