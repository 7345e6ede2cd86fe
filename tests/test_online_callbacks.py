"""``on_error="stop"`` in the Lightning and HF callbacks: a real NaN in the model's forward
from a given optimizer step on stops the real Trainer at that step's boundary, and the run
is ``stopped`` and readable."""

from __future__ import annotations

import json

import lightning.pytorch as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import stabscope
from stabscope import RecorderConfig, Schedule
from stabscope.errors import StabscopeWarning

POISON_AT, STEPS = 4, 12  # the forward turns non-finite from this optimizer step on
CHEAP = RecorderConfig(preset="cheap", schedule=Schedule(dense=100))


class Poisoned(nn.Module):
    """An MLP whose input is multiplied by inf from training call ``POISON_AT`` on: the NaN
    the rules see is made by the real forward (inf * 0 in the first matmul)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            if self.calls >= POISON_AT:
                x = x * torch.inf
            self.calls += 1
        return self.net(x)


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8 * STEPS, 6, generator=g), torch.randn(8 * STEPS, 3, generator=g)
    return TensorDataset(x, y)


def meta(run) -> dict:
    return json.loads((run / "meta.json").read_text())


def assert_stopped_at_the_poison(run, trainer_steps: int) -> None:
    m = meta(run)
    assert m["status"] == "stopped", m.get("notes")
    assert m["stopped_by"]["rule"] == "nonfinite" and m["stopped_by"]["step"] == POISON_AT
    # Stopped at the boundary of the step whose rows tripped it: no further optimizer step.
    assert m["steps"] == trainer_steps == POISON_AT + 1 < STEPS
    assert stabscope.load_run(run, metrics=["loss"]).step.max() == POISON_AT


class Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = Poisoned()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.model(x) - y).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.filterwarnings("ignore::stabscope.errors.StabscopeWarning")
def test_lightning_trainer_stops(tmp_path):
    from stabscope.integrations.lightning import StabscopeCallback

    run = tmp_path / "lit"
    callback = StabscopeCallback(run, CHEAP, on_error="stop")
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Module(), DataLoader(data(), batch_size=8))
    assert trainer.should_stop
    assert_stopped_at_the_poison(run, trainer.global_step)


class Regression(nn.Module):
    """The Trainer's model: a dict batch in, ``{"loss": ...}`` out."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Poisoned()

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": (self.model(x) - labels).pow(2).mean()}


@pytest.mark.slow
def test_hf_trainer_stops(tmp_path):
    from transformers import Trainer, TrainingArguments

    from stabscope.integrations.hf import StabscopeCallback

    run = tmp_path / "hf"
    x, y = data().tensors
    rows = [{"x": a, "labels": b} for a, b in zip(x, y)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    callback = StabscopeCallback(run, CHEAP, on_error="stop")
    trainer = Trainer(model=Regression(), args=args, train_dataset=rows, callbacks=[callback])
    with pytest.warns(StabscopeWarning, match="nonfinite"):
        trainer.train()
    assert_stopped_at_the_poison(run, trainer.state.global_step)
