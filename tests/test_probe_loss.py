"""``probe_loss`` (the probe batch's loss, the same batch in eval mode at steps 2, 4, 8, ...
and at the end) and what ``loss-divergence`` makes of it.

The readings are checked against the loss this test computes itself on that batch with the
weights of each step. A curriculum whose later batches are harder raises the training loss
while the model keeps what it learned (the probe batch's loss stays low): a warning, not an
error; a run whose learning rate jumps x1000 un-learns on the probe batch too: an error. A
GAN's summed losses, two players', are not judged; one loss under two optimizers is."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stabscope
from stabscope import Recorder, RecorderConfig
from stabscope.drivers.zerocode import profile_training_script
from stabscope.rules import check_run
from stabscope.store import RUN_MODULE
from stabscope.store.run_meta import load_meta
from tests.scripts.harness import recorded_ce_step

STEPS = 40


def probe_rows(run) -> dict[int, float]:
    df = stabscope.load_run(run, modules=[RUN_MODULE], metrics=["probe_loss"])
    return dict(zip(df.step.astype(int), df.value))


def divergence(run) -> list:
    return [f for f in check_run(run).findings if f.rule == "loss-divergence"]


def test_probe_loss_is_the_loss_on_the_probe_batch_with_each_steps_weights(tmp_path):
    """Dropout on: the probe reads eval mode, as this test does; training is unchanged."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.3), nn.Tanh(), nn.Linear(32, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(2)
    x0, y0 = torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)

    def probe(model: nn.Module) -> torch.Tensor:
        return F.mse_loss(model(x0), y0)

    expected = {}
    config = RecorderConfig(online_rules=False)
    with Recorder(net, tmp_path / "run", config, forward=probe) as rec:
        for step in range(STEPS):
            x, y = torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)
            loss = F.mse_loss(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss)
            net.eval()
            with torch.no_grad():
                expected[step] = F.mse_loss(net(x0), y0).item()
            net.train()
    got = probe_rows(tmp_path / "run")
    assert sorted(got) == [2, 4, 8, 16, 32, STEPS - 1]  # the due steps, and the end
    assert [got[s] for s in sorted(got)] == pytest.approx(
        [expected[s] for s in sorted(got)], rel=1e-6
    )


def train_classifier(
    run,
    curriculum: bool,
    jump_at: int | None = None,
    steps: int = 160,
    stop: bool = False,
    easy_share: float = 0.4,
    delay: float = 0.0,
):
    """A logistic task on 10 features. ``curriculum``: early batches keep only the easy rows
    (|margin| >= 2, almost noise-free labels) for the first ``easy_share`` of the steps, then
    the full data with its label noise (the loss rises to the best reachable, ~0.4 nats);
    ``jump_at``: the lr x1000 from that step on (to 10: Adam then un-learns). ``stop``: the
    online rules on, ``on_error="stop"``; ``delay``: seconds a step also takes (a step of a
    real model's length, so that the online checks, paced to their cost, come every few
    steps)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(10, generator=g)
    w /= w.norm()

    def sample(n: int, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(8 * n, 10, generator=g)
        x = x[(x @ w).abs() >= margin][:n]  # (n, 10)
        y = (torch.rand(len(x), generator=g) < torch.sigmoid(3 * (x @ w))).long()
        return x, y

    net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = sample(128, 2.0 if curriculum else 0.0)

    def probe(model: nn.Module) -> torch.Tensor:
        return F.cross_entropy(model(first[0]), first[1])

    config = RecorderConfig(online_rules=stop)
    on_error = "stop" if stop else "warn"
    with Recorder(net, run, config, forward=probe, on_error=on_error) as rec:
        for step in range(steps):
            if rec.should_stop:
                break
            if jump_at is not None and step == jump_at:
                for group in opt.param_groups:
                    group["lr"] *= 1000
            margin = 2.0 if curriculum and step < easy_share * steps else 0.0
            x, y = first if step == 0 else sample(128, margin)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss)
            time.sleep(delay)


@pytest.mark.slow
def test_a_curriculum_warns_and_a_divergence_stays_an_error(tmp_path):
    curriculum, jumped = tmp_path / "curriculum", tmp_path / "jumped"
    train_classifier(curriculum, curriculum=True)
    train_classifier(jumped, curriculum=False, jump_at=60)
    (warning,) = divergence(curriculum)
    assert warning.severity == "warning" and "got harder" in warning.message
    probe = probe_rows(curriculum)
    first, end = probe[min(probe)], probe[max(probe)]
    assert end < first / 4  # the easy probe batch: still learned at the end
    (error,) = divergence(jumped)
    assert error.severity == "error"
    probe = probe_rows(jumped)
    best = min(probe.values())
    assert probe[max(probe)] - best > 0.5 * (probe[min(probe)] - best)  # un-learned there too


@pytest.mark.slow
def test_a_live_divergence_read_with_a_stale_probe_reading_is_read_again(tmp_path):
    """Under ``on_error="stop"`` the loss check judges the curriculum's rise with the probe
    batch's last reading, at a power-of-two step before it: the rise alone reads as a
    divergence. The recorder then reads the probe batch once more at that boundary, and the
    rule, run again, finds the model kept what it learned there: the run trains on, to the
    end, as the check of the whole run judges it. The lr x1000 jump is stopped."""
    curriculum, jumped = tmp_path / "curriculum", tmp_path / "jumped"
    train_classifier(curriculum, curriculum=True, stop=True, easy_share=0.25, delay=0.05)
    meta = load_meta(curriculum)
    assert (meta.status, meta.steps) == ("complete", 160)
    live = [f["rule"] for f in (meta.doc.get("online") or {}).get("findings", [])]
    assert "loss-divergence" not in live
    readings = sorted(probe_rows(curriculum))
    # Read again where the live check asked: steps that are no power of two, before the end.
    extra = [s for s in readings[:-1] if s & (s - 1)]
    assert extra, readings
    train_classifier(jumped, curriculum=False, jump_at=60, stop=True, delay=0.05)
    meta = load_meta(jumped)
    assert meta.status == "stopped" and meta.doc["stopped_by"]["rule"] == "loss-divergence"


def train_blown_up(run, steps: int = 120) -> list[float]:
    """The logistic task at Adam lr 3 for two steps (the weights thrown far off), then at
    1e-4, too small to bring them back: the script's own losses."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(10, generator=g)
    w /= w.norm()

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 10, generator=g)
        y = (torch.rand(n, generator=g) < torch.sigmoid(3 * (x @ w))).long()
        return x, y

    net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.Adam(net.parameters(), lr=3.0)
    first = sample(128)

    def probe(model: nn.Module) -> torch.Tensor:
        return F.cross_entropy(model(first[0]), first[1])

    seen = []
    with Recorder(net, run, RecorderConfig(online_rules=False), forward=probe) as rec:
        for step in range(steps):
            if step == 2:
                for group in opt.param_groups:
                    group["lr"] = 1e-4
            x, y = first if step == 0 else sample(128)
            seen.append(recorded_ce_step(net, opt, rec, x, y))
    return seen


@pytest.mark.slow
def test_a_probe_batch_first_read_after_a_blow_up_does_not_excuse_it(tmp_path):
    """The probe batch is first read at step 2, after the blow-up: it falls a little from
    there, but ends ~150x above the loss the same data scored at step 0. The model kept
    nothing, and the rise stays an error."""
    seen = train_blown_up(tmp_path / "run")
    probe = probe_rows(tmp_path / "run")
    first, end = probe[min(probe)], probe[max(probe)]
    assert end < first  # what the probe alone would have called kept
    assert end > 100 * seen[0]  # but far above where the model began
    (error,) = divergence(tmp_path / "run")
    assert error.severity == "error" and "got harder" not in error.message


GAME = """
import sys
import torch
import torch.nn.functional as F
from torch import nn

torch.manual_seed(0)
game = sys.argv[1] == "gan"
G = nn.Sequential(nn.Linear(4, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
D = nn.Sequential(nn.Linear(1, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
og = torch.optim.Adam(G.parameters(), 1e-3, betas=(0.5, 0.999))
od = torch.optim.Adam(D.parameters(), 1e-3, betas=(0.5, 0.999))
g = torch.Generator().manual_seed(1)
for step in range(300):
    real = 3 + 0.5 * torch.randn(64, 1, generator=g)
    if game:  # the discriminator, then the generator: the step sums both players' losses
        fake = G(torch.randn(64, 4, generator=g))
        ones, zeros = torch.ones(64, 1), torch.zeros(64, 1)
        ld = F.binary_cross_entropy_with_logits(D(real), ones)
        ld = ld + F.binary_cross_entropy_with_logits(D(fake.detach()), zeros)
        od.zero_grad(); ld.backward(); od.step()
        lg = F.binary_cross_entropy_with_logits(D(fake), ones)
        og.zero_grad(); lg.backward(); og.step()
    else:  # one loss, two models under two optimizers after one backward; the lr x1000
        if step == 100:
            for opt in (og, od):
                for group in opt.param_groups:
                    group["lr"] *= 1000
        x = torch.randn(64, 4, generator=g)
        loss = F.mse_loss(D(G(x)), x[:, :1])
        og.zero_grad(); od.zero_grad(); loss.backward(); og.step(); od.step()
"""


@pytest.mark.slow
def test_a_gan_is_not_judged_by_its_summed_losses(tmp_path):
    script = tmp_path / "game.py"
    script.write_text(GAME)
    config = RecorderConfig(online_rules=False)
    profile_training_script(script, ["gan"], tmp_path / "gan", config, budget=300)
    profile_training_script(script, ["one"], tmp_path / "one", config, budget=300)
    assert divergence(tmp_path / "gan") == []
    losses = stabscope.load_run(tmp_path / "gan", metrics=["loss"]).value
    assert losses.iloc[-20:].median() > losses.iloc[20:40].median() * 1.05  # it rose
    (error,) = divergence(tmp_path / "one")
    assert error.severity == "error"
