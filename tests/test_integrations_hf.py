"""The transformers callback on a real ``Trainer`` (CPU, a tiny GPT-2 built from a config, no
downloads), checked against what the Trainer logged and what it handed the optimizer."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import stabscope
from stabscope.integrations.hf import StabscopeCallback
from stabscope.probes.sharpness import due, stability_index
from tests.conftest import ROOT

STEPS = 4


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config)


def dataset(n: int = 16, length: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, length), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


class Witness(TrainerCallback):
    """What the Trainer logged, and what it handed the optimizer at each step."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.logged: dict[int, dict[str, float]] = {}
        self.steps: list[dict] = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        params = dict(self.model.named_parameters())  # after clipping
        self.steps.append(
            {
                "grad": {n: p.grad.double().norm().item() for n, p in params.items()},
                "weight": {n: p.detach().clone() for n, p in params.items()},
                "lr": optimizer.param_groups[0]["lr"],
            }
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logged[state.global_step] = dict(logs)


class Bigram(torch.nn.Module):
    """A model without loss kwargs: the Trainer passes it no ``num_items_in_batch``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(64, 64)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.emb(input_ids[:, :-1])  # (B, T-1, vocab)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten())
        return {"loss": loss, "logits": logits}


def train(
    run_dir,
    accumulate: int,
    model: torch.nn.Module | None = None,
    steps: int = STEPS,
    recorded: bool = True,
    extra: tuple[TrainerCallback, ...] = (),
    callback_options: dict | None = None,
    **arguments,
) -> tuple[torch.nn.Module, Witness, Trainer]:
    """``extra`` callbacks run before stabscope's; ``recorded=False``: without stabscope."""
    model = tiny_gpt2() if model is None else model
    witness = Witness(model)
    args = TrainingArguments(
        output_dir=str(run_dir.parent / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulate,
        learning_rate=1e-3,
        # computed and logged, by default never clipping
        max_grad_norm=arguments.pop("max_grad_norm", 1e9),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **arguments,
    )
    callbacks = [witness, *extra]
    if recorded:
        schedule = stabscope.Schedule(dense=100, every=0)
        callbacks.append(StabscopeCallback(run_dir, schedule=schedule, **(callback_options or {})))
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), callbacks=callbacks)
    trainer.train()
    return model, witness, trainer


def series(run_dir, metric: str, module: str) -> np.ndarray:
    df = stabscope.load_run(run_dir, modules=[module], metrics=[metric], phase="train")
    return df[df.call == 0].sort_values("step").value.to_numpy(np.float64)


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])
def test_recorded_steps_loss_and_gradients_are_the_trainers(run_dir, accumulate):
    model, witness, trainer = train(run_dir, accumulate)
    assert trainer.state.global_step == len(witness.steps) == STEPS
    meta = stabscope.read_meta(run_dir)
    assert meta["status"] == "complete" and meta["steps"] == STEPS
    assert meta["run"]["framework"] == "transformers"
    logged = [witness.logged[s + 1] for s in range(STEPS)]
    np.testing.assert_allclose(series(run_dir, "loss", "__run__"), [g["loss"] for g in logged])
    # The gradient the optimizer saw: per parameter, and as the norm the Trainer logged.
    names = [n for n, _ in model.named_parameters()]
    grads = stabscope.load_run(run_dir, modules=names, metrics=["param_grad_norm"])
    total = np.sqrt(grads.groupby("step").value.apply(lambda v: (v.astype(float) ** 2).sum()))
    np.testing.assert_allclose(total, [g["grad_norm"] for g in logged], rtol=1e-5)
    for name in ("transformer.wte.weight", "transformer.h.1.attn.c_attn.weight"):
        want = [s["grad"][name] for s in witness.steps]
        np.testing.assert_allclose(series(run_dir, "param_grad_norm", name), want, rtol=1e-5)
        want = [s["weight"][name].double().norm().item() for s in witness.steps]
        np.testing.assert_allclose(series(run_dir, "param_norm", name), want, rtol=1e-5)
        after = dict(model.named_parameters())[name].detach()
        delta = (after - witness.steps[-1]["weight"][name]).double().norm().item()
        assert series(run_dir, "update_norm", name)[-1] == pytest.approx(delta, rel=1e-4)
    # Micro-batches are the calls of one step; the loss hook is gone after training.
    acts = stabscope.load_run(run_dir, modules=["transformer.h.0"], metrics=["act_rms"])
    assert set(acts.groupby("step").call.nunique()) == {accumulate}
    assert not model._forward_hooks


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])
def test_grad_norm_is_the_trainers_logged_norm_before_its_clip(run_dir, accumulate):
    """With the Trainer clipping (max_grad_norm), grad_norm is the norm it logged (its clip's
    return), and grad_norm_clipped the norm of what it handed the optimizer."""
    _, witness, _ = train(run_dir, accumulate, max_grad_norm=0.5)
    logged = [witness.logged[s + 1]["grad_norm"] for s in range(STEPS)]
    assert min(logged) > 0.5  # every step clips
    np.testing.assert_allclose(series(run_dir, "grad_norm", "__run__"), logged, rtol=1e-6)
    handed = [np.sqrt(sum(g**2 for g in s["grad"].values())) for s in witness.steps]
    np.testing.assert_allclose(series(run_dir, "grad_norm_clipped", "__run__"), handed, rtol=1e-5)


@pytest.mark.slow
def test_without_loss_kwargs_the_micro_batch_means_are_averaged(run_dir):
    _, witness, trainer = train(run_dir, 2, Bigram())
    assert not trainer.model_accepts_loss_kwargs
    logged = [witness.logged[s + 1]["loss"] for s in range(STEPS)]
    np.testing.assert_allclose(series(run_dir, "loss", "__run__"), logged, rtol=1e-6)


@pytest.mark.slow
def test_lr_is_the_one_each_optimizer_step_used(run_dir):
    """The Trainer steps its scheduler before ``on_step_end``: with a linear schedule of 2
    warm-up steps over 4, the lr recorded at step s is the one step s used,
    1e-3 · (s/2 during warm-up, else (4-s)/2), not the next step's."""
    _, witness, _ = train(run_dir, 1, warmup_steps=2, lr_scheduler_type="linear")
    want = [1e-3 * (s / 2 if s < 2 else (STEPS - s) / (STEPS - 2)) for s in range(STEPS)]
    assert want == [0.0, 5e-4, 1e-3, 5e-4]
    np.testing.assert_allclose([s["lr"] for s in witness.steps], want, rtol=1e-12)
    lr = stabscope.load_run(run_dir, metrics=["lr"])  # the Trainer's two groups: decay or not
    assert sorted(lr["index"].unique()) == [0, 1]
    for _, group in lr.groupby("index"):
        np.testing.assert_allclose(group.sort_values("step").value, want, rtol=1e-6)


class IndexWitness(TrainerCallback):
    """The stability index computed here at every step end, before the recorder's
    ``on_step_end``: on the model inputs of the first training pass, as captured by a
    forward pre-hook, with the loss the model computes from them (the micro-batch mean)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.first: dict[str, torch.Tensor] | None = None
        self.index: dict[int, float] = {}
        self.handle = model.register_forward_pre_hook(self.see, with_kwargs=True)

    def see(self, module, args, kwargs):
        if self.first is None and module.training:
            self.first = {k: kwargs[k].clone() for k in ("input_ids", "labels")}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        if not due(state.global_step - 1):
            return
        first = self.first
        inner = optimizer.optimizer  # inside accelerate's AcceleratedOptimizer
        found = stability_index(model, lambda m: m(**first).loss, [inner])
        assert not isinstance(found, str), found
        self.index[state.global_step - 1] = found[0]


@pytest.mark.slow
def test_stability_index_is_measured_on_the_first_batch_and_training_is_unchanged(run_dir):
    """5 steps of 2 micro-batches: the index at steps 2 and 4 is the first micro-batch's,
    with its own mean loss (not the Trainer's share of the step's tokens); the weights after
    training are bit-identical to a run without stabscope (GPT-2's dropout is on)."""
    model = tiny_gpt2()
    probe = IndexWitness(model)
    # A constant lr: the linear default's is 0 after the last step, and so is the index.
    const = {"lr_scheduler_type": "constant"}
    every = {"sharpness_budget": math.inf}  # every measurement (a callback's default: 5%)
    _, _, trainer = train(run_dir, 2, model, steps=5, extra=(probe,), callback_options=every,
                          **const)  # fmt: skip
    assert trainer.model_accepts_loss_kwargs  # num_items_in_batch is passed to the model
    index = stabscope.load_run(run_dir, metrics=["stability_index"]).sort_values("step")
    assert index.step.tolist() == [2, 4]
    want = [probe.index[2], probe.index[4]]
    np.testing.assert_allclose(index.value.to_numpy(float), want, rtol=1e-5)
    assert (index.value > 0).all()
    plain, _, _ = train(run_dir.parent / "plain", 2, steps=5, recorded=False, **const)
    after, want = dict(model.named_parameters()), dict(plain.named_parameters())
    assert all(torch.equal(after[n], want[n]) for n in want)
    assert not model._forward_hooks  # the probe batch's hook is gone too


@pytest.mark.slow
def test_a_train_that_raises_leaves_a_failed_readable_run(tmp_path):
    """The Trainer has no exception hook: the run is closed as failed when the process ends."""
    run = tmp_path / "run"
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from transformers import TrainerCallback
        import tests.test_integrations_hf as t

        class Boom(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == 2:
                    raise RuntimeError("disk full")

        t.Witness = lambda model: Boom()
        t.train(Path({str(run)!r}), 1)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1 and "disk full" in proc.stderr
    meta = stabscope.read_meta(run)
    assert meta["status"] == "failed"
    assert "before training finished" in meta["error"]["message"]
    # Boom runs before the recorder's on_step_end: steps 0 (and its loss) were recorded.
    assert series(run, "loss", "__run__").size == 1
