"""The Lightning callback on a real ``lightning.pytorch.Trainer`` (CPU, a few steps, synthetic
data), checked against what the LightningModule itself saw at each optimizer step."""

from __future__ import annotations

import math
import subprocess
import sys

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import stabscope
from stabscope import Schedule
from stabscope.integrations.lightning import MANUAL_NOTE, StabscopeCallback
from stabscope.probes.sharpness import due, stability_index
from stabscope.rules.forecast import signals
from stabscope.rules.view import RunView
from tests.conftest import batch_maker, mlp

BATCHES, ACCUMULATE = 9, 2  # 4 windows of 2 micro-batches, then one of 1: 5 optimizer steps


class Regressor(L.LightningModule):
    """MSE regression that notes, at every optimizer step, what the step is made of."""

    def __init__(self, fail_at: int = -1, warmup: int = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = mlp()
        self.fail_at = fail_at
        self.warmup = warmup  # steps of a linear warm-up scheduler stepped every step; 0: none
        self.window: list[float] = []  # raw micro-batch losses since the last optimizer step
        self.steps: list[dict] = []

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            raise RuntimeError("data loader gave a bad batch")
        x, y = batch
        loss = (self.net(x) - y).pow(2).mean()
        if self.training:  # not the stability index's replay of the first batch (eval mode)
            self.window.append(loss.item())
        return loss

    def on_before_optimizer_step(self, optimizer):  # after backward, before the update
        params = dict(self.named_parameters())
        self.steps.append(
            {
                "loss": float(np.mean(self.window)),
                "grad": {n: p.grad.double().norm().item() for n, p in params.items()},
                "weight": {n: p.detach().clone() for n, p in params.items()},
                "lr": optimizer.param_groups[0]["lr"],
            }
        )
        self.window = []

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        if not self.warmup:
            return opt
        warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / self.warmup, 1.0))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warm, "interval": "step"}}


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """(72, 6) inputs and (72, 3) targets: 9 batches of 8, in order."""
    make = batch_maker(6, 3)
    x, y = (torch.cat(t) for t in zip(*(make(i) for i in range(BATCHES))))
    return x, y


def fit(
    module: L.LightningModule,
    run_dir,
    extra: tuple[L.Callback, ...] = (),
    recorded: bool = True,
    accumulate: int = ACCUMULATE,
    clip: float | None = None,
    **options,
) -> L.Trainer:
    """``extra`` callbacks run before stabscope's; ``recorded=False``: without stabscope."""
    x, y = data()
    callbacks = [*extra]
    if recorded:
        schedule = Schedule(dense=100, every=0)
        callbacks.append(StabscopeCallback(run_dir, schedule=schedule, **options))
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        accumulate_grad_batches=accumulate,
        gradient_clip_val=clip,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    return trainer


def series(run_dir, metric: str, module: str) -> np.ndarray:
    df = stabscope.load_run(run_dir, modules=[module], metrics=[metric], phase="train")
    return df[df.call == 0].sort_values("step").value.to_numpy(np.float64)


def test_one_step_per_optimizer_step_with_this_steps_loss_and_gradients(run_dir):
    module = Regressor()
    trainer = fit(module, run_dir)
    steps = module.steps
    assert trainer.global_step == len(steps) == 5
    meta = stabscope.read_meta(run_dir)
    assert meta["status"] == "complete" and meta["steps"] == meta["recorded_steps"] == 5
    assert meta["run"]["framework"] == "lightning"
    np.testing.assert_allclose(series(run_dir, "loss", "__run__"), [s["loss"] for s in steps])
    for name in ("net.0.weight", "net.2.bias", "net.4.weight"):
        want = [s["grad"][name] for s in steps]
        np.testing.assert_allclose(series(run_dir, "param_grad_norm", name), want, rtol=1e-5)
        want = [s["weight"][name].double().norm().item() for s in steps]
        np.testing.assert_allclose(series(run_dir, "param_norm", name), want, rtol=1e-5)
        # The last update: the weights after fit against those before the last step.
        after = dict(module.named_parameters())[name].detach()
        delta = (after - steps[-1]["weight"][name]).double().norm().item()
        assert series(run_dir, "update_norm", name)[-1] == pytest.approx(delta, rel=1e-4)
    # Micro-batches are calls of one step: 2 per full window, 1 in the last.
    acts = stabscope.load_run(run_dir, modules=["net.0"], metrics=["act_rms"], phase="train")
    assert acts.groupby("step").call.nunique().tolist() == [2, 2, 2, 2, 1]
    assert all(not m._forward_hooks for m in module.modules())  # nothing left attached


def test_grad_norm_is_the_norm_before_lightnings_clip(run_dir):
    """gradient_clip_val: Lightning clips inside the optimizer's closure, after
    ``on_before_optimizer_step`` (where the module took its gradients' norms)."""
    module = Regressor()
    fit(module, run_dir, clip=0.05)
    pre = [np.sqrt(sum(g**2 for g in s["grad"].values())) for s in module.steps]
    assert min(pre) > 0.05  # every step clips
    np.testing.assert_allclose(series(run_dir, "grad_norm", "__run__"), pre, rtol=1e-5)
    # clip_grad_norm_ scales by max_norm / (norm + 1e-6)
    want = [0.05 * p / (p + 1e-6) for p in pre]
    np.testing.assert_allclose(series(run_dir, "grad_norm_clipped", "__run__"), want, rtol=1e-5)


def test_lr_is_the_one_each_optimizer_step_used(run_dir):
    """Lightning steps the scheduler before ``on_train_batch_end``: the lr recorded at step s
    is still the one step s used, 1e-2 · min((s+1)/3, 1), not the next step's."""
    module = Regressor(warmup=3)
    fit(module, run_dir)
    want = [1e-2 * min((s + 1) / 3, 1.0) for s in range(5)]
    np.testing.assert_allclose([s["lr"] for s in module.steps], want, rtol=1e-12)
    np.testing.assert_allclose(series(run_dir, "lr", "__run__"), want, rtol=1e-6)


def test_an_exception_in_fit_closes_the_run_as_failed(run_dir):
    module = Regressor(fail_at=5)  # after two optimizer steps
    with pytest.raises(RuntimeError, match="bad batch"):
        fit(module, run_dir)
    meta = stabscope.read_meta(run_dir)
    assert meta["status"] == "failed" and meta["error"]["type"] == "RuntimeError"
    np.testing.assert_allclose(
        series(run_dir, "loss", "__run__"), [s["loss"] for s in module.steps]
    )
    assert len(module.steps) == 2
    assert all(not m._forward_hooks for m in module.modules())


class Logging(L.LightningModule):
    """MLP regression with dropout that logs its loss from ``training_step``, as most do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Dropout(0.2), nn.Linear(12, 3))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.net(x) - y).pow(2).mean()

    def training_step(self, batch, batch_idx):
        loss = self.loss(*batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return {"loss": loss}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class IndexWitness(L.Callback):
    """The stability index computed here when an optimizer step ends, before the recorder's
    ``on_train_batch_end``: on the first batch the DataLoader yields (not shuffled)."""

    def __init__(self) -> None:
        x, y = data()
        self.first = (x[:8], y[:8])
        self.index: dict[int, float] = {}
        self.global_step = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step, self.global_step = self.global_step, trainer.global_step
        if trainer.global_step != step and due(step):
            x, y = self.first
            found = stability_index(pl_module, lambda m: m.loss(x, y), trainer.optimizers)
            self.index[step] = found[0]


def test_stability_index_replays_the_first_batch_and_training_is_unchanged(run_dir):
    """5 optimizer steps: the index at steps 2 and 4 is the first batch's; the replayed
    ``training_step`` logs nothing (the logged metrics are those of a run without
    stabscope), and the weights after fit are bit-identical to that run's (dropout on)."""
    module, witness = Logging(), IndexWitness()
    # every measurement (a callback's default keeps the index within 5% of the training)
    trainer = fit(module, run_dir, extra=(witness,), sharpness_budget=math.inf)
    index = stabscope.load_run(run_dir, metrics=["stability_index"]).sort_values("step")
    assert index.step.tolist() == [2, 4]
    want = [witness.index[2], witness.index[4]]
    np.testing.assert_allclose(index.value.to_numpy(float), want, rtol=1e-5)
    assert (index.value > 0).all()
    plain_module = Logging()
    plain = fit(plain_module, run_dir.parent / "plain", recorded=False)
    want_weights = dict(plain_module.named_parameters())
    assert all(torch.equal(p, want_weights[n]) for n, p in module.named_parameters())
    assert trainer.logged_metrics.keys() == plain.logged_metrics.keys()
    for name, value in plain.logged_metrics.items():
        assert torch.equal(trainer.logged_metrics[name], value), name
    assert "log" not in module.__dict__  # the switch is gone


def test_manual_optimization_is_not_replayed(run_dir):
    class Manual(Regressor):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            loss = (self.net(batch[0]) - batch[1]).pow(2).mean()
            self.manual_backward(loss)
            opt.step()
            self.calls = getattr(self, "calls", 0) + 1

    module = Manual()
    fit(module, run_dir, accumulate=1)
    assert module.calls == BATCHES  # no replay: one call per batch
    assert stabscope.load_run(run_dir, metrics=["stability_index"]).empty
    assert MANUAL_NOTE in stabscope.read_meta(run_dir)["notes"]


def test_manual_optimization_that_returns_no_loss_records_its_backward_losses(run_dir):
    """Two nets stepped by hand (a GAN's shape): ``training_step`` returns nothing, and the
    step's loss is the sum of what it passed to ``manual_backward``. The loss module it holds
    is not recorded as a module (its output is the loss, the gradient w.r.t. it is 1)."""

    class TwoNets(Regressor):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.other = mlp()
            self.criterion = torch.nn.MSELoss()
            self.sums: list[float] = []

        def training_step(self, batch, batch_idx):
            first, second = self.optimizers()
            x, y = batch
            a = self.criterion(self.net(x), y)
            first.zero_grad()
            self.manual_backward(a)
            first.step()
            b = self.criterion(self.other(x), 2 * y)
            second.zero_grad()
            self.manual_backward(b)
            second.step()
            if self.training:
                self.sums.append(a.item() + b.item())

        def on_before_optimizer_step(self, optimizer):  # the base class's notes: not here
            pass

        def configure_optimizers(self):
            return [
                torch.optim.Adam(self.net.parameters(), lr=1e-2),
                torch.optim.SGD(self.other.parameters(), lr=1e-2),
            ]

    module = TwoNets()
    fit(module, run_dir, accumulate=1)
    assert len(module.sums) == BATCHES
    np.testing.assert_allclose(series(run_dir, "loss", "__run__"), module.sums, rtol=1e-6)
    names = [m["name"] for m in stabscope.read_meta(run_dir)["modules"]]
    assert "net.0" in names and "criterion" not in names
    assert "manual_backward" not in vars(module)  # the class's method again


def test_closure_steps_record_the_gradients_the_closure_computed(run_dir):
    """Lightning's mechanism in plain torch: ``optimizer.step(closure)`` runs backward after
    the step's pre-hooks; the recorded gradient must be this step's, not the last one's."""
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    make = batch_maker(6, 3)
    seen = []
    with stabscope.Recorder(model, run_dir, schedule=Schedule(dense=3, every=0)) as rec:
        for step in range(3):

            def closure(step=step):
                opt.zero_grad()
                x, y = make(step)
                loss = (model(x) - y).pow(2).mean()
                loss.backward()
                seen.append(model[0].weight.grad.double().norm().item())
                return loss

            rec.step(loss=opt.step(closure))
    np.testing.assert_allclose(series(run_dir, "param_grad_norm", "0.weight"), seen, rtol=1e-6)


def test_importing_stabscope_imports_neither_lightning_nor_transformers():
    code = (
        "import sys, stabscope, stabscope.integrations; "
        "names = ('lightning', 'pytorch_lightning', 'transformers'); "
        "bad = [m for m in names if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_callback_keeps_the_index_within_five_percent_by_default(run_dir):
    """Riding along real training, the index may take 5% of the (planned) training time: 5
    optimizer steps allow a quarter of a step, less than one measurement (~20 steps), so the
    scheduled ones at steps 2 and 4 are skipped and counted."""
    fit(Logging(), run_dir)
    index = stabscope.read_meta(run_dir)["stability_index"]
    assert (index["budget"], index["measured"], index["skipped"]) == (0.05, 0, 2)
    assert stabscope.load_run(run_dir, metrics=["stability_index"]).empty


def test_the_forecast_says_the_budget_skipped_every_index_measurement(run_dir):
    """A short plan under a callback measures no index (above): the forecast's evidence says
    that the budget skipped them, not a bare 'not measured' that reads like a broken probe."""
    fit(Logging(), run_dir)
    found = signals(RunView.open(run_dir))
    for name in ("stability_now", "stability_peak", "stability_forecast"):
        assert math.isnan(found[name].value)
        assert "2 scheduled measurement(s) skipped" in found[name].evidence
        assert "(sharpness_budget;" in found[name].evidence
