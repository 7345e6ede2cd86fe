"""The every-step gradient norm before and after the script's clip, and the per-block update
norms, against what a real training script computes itself: ``clip_grad_norm_``'s return
value, the norm of the gradients before and after the clip, the weights before and after each
step. Every step, recorded or not (the schedule here records steps 0-1 only)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn.utils import clip_grad as clip_grad_module

# Imported by name before any run opens, as scripts do: the recorder must still see the clip.
from torch.nn.utils import clip_grad_norm_

import stabscope
from stabscope import Schedule
from stabscope.drivers.script import ScriptConfig
from stabscope.record import clip_sites

STEPS = 12
MAX_NORM = 0.3  # below the sample GPT's gradient norm at lr 1e-2: most steps clip


def gpt_and_batches(depth: int = 2):
    import gpt

    cfg = ScriptConfig(gpt.CONFIG | {"depth": depth, "width": 32, "seq_len": 16, "batch_size": 4})
    torch.manual_seed(0)
    model = gpt.model(cfg)
    data = gpt.batches(cfg)
    batches = [next(data) for _ in range(STEPS * 2)]
    return model, batches, gpt.loss


def total_norm(model) -> float:
    """The global L2 gradient norm in float64, independently of torch's clip."""
    grads = [p.grad.double().flatten() for p in model.parameters() if p.grad is not None]
    return torch.cat(grads).norm().item()


def run_script(model, batches, loss_fn, run_dir=None, clip="norm", accumulate=1, **options):
    """A nanoGPT-like loop (AdamW, micro-batches, a clip before the step). Returns, per step,
    what the script saw: the clip's return, the norm before and after the clip, the weights
    of every parameter before and after the step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rec = None
    if run_dir is not None:
        schedule = Schedule(dense=2, every=0)
        rec = stabscope.Recorder(
            model, run_dir, preset="cheap", schedule=schedule, **options
        ).start()
    seen: list[dict] = []
    for step in range(STEPS):
        for micro in range(accumulate):
            loss = loss_fn(model, batches[step * accumulate + micro]) / accumulate
            loss.backward()
        entry = {"pre": total_norm(model)}
        if clip == "norm":
            entry["returned"] = clip_grad_norm_(model.parameters(), MAX_NORM).item()
        elif clip == "value":
            torch.nn.utils.clip_grad_value_(model.parameters(), 1e-3)
        entry["post"] = total_norm(model)
        entry["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        entry["after"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        if rec is not None:
            rec.step(loss)
        seen.append(entry)
    if rec is not None:
        rec.close()
    return seen


def series(run_dir, metric: str, module: str = "__run__") -> tuple[np.ndarray, np.ndarray]:
    df = stabscope.load_run(run_dir, modules=[module], metrics=[metric]).sort_values("step")
    return df.step.to_numpy(), df.value.to_numpy(np.float64)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_pre_clip_norm_is_clip_grad_norms_return_at_every_step(run_dir, accumulate):
    model, batches, loss_fn = gpt_and_batches()
    seen = run_script(model, batches * 2, loss_fn, run_dir, accumulate=accumulate)
    assert sum(s["returned"] > MAX_NORM for s in seen) >= STEPS // 2  # it really clips
    steps, pre = series(run_dir, "grad_norm")
    assert steps.tolist() == list(range(STEPS))
    np.testing.assert_allclose(pre, [s["returned"] for s in seen], rtol=1e-6)
    np.testing.assert_allclose(pre, [s["pre"] for s in seen], rtol=1e-5)
    steps, post = series(run_dir, "grad_norm_clipped")
    assert steps.tolist() == list(range(STEPS))
    np.testing.assert_allclose(post, [s["post"] for s in seen], rtol=1e-5)
    # param_grad_norm is read before optimizer.step(): after the clip (hence grad_norm)
    grads = stabscope.load_run(run_dir, metrics=["param_grad_norm"])
    clipped = np.sqrt(grads.groupby("step").value.apply(lambda v: (v.astype(float) ** 2).sum()))
    np.testing.assert_allclose(clipped, [s["post"] for s in seen[:2]], rtol=1e-5)


def test_without_a_clip_the_norm_is_that_of_the_gradients_the_optimizer_received(run_dir):
    model, batches, loss_fn = gpt_and_batches()
    seen = run_script(model, batches, loss_fn, run_dir, clip=None)
    steps, pre = series(run_dir, "grad_norm")
    assert steps.tolist() == list(range(STEPS))
    np.testing.assert_allclose(pre, [s["pre"] for s in seen], rtol=1e-5)
    assert series(run_dir, "grad_norm_clipped")[0].size == 0


def test_clip_by_value_keeps_the_norm_before_it(run_dir):
    model, batches, loss_fn = gpt_and_batches()
    seen = run_script(model, batches, loss_fn, run_dir, clip="value")
    assert all(s["post"] < s["pre"] / 2 for s in seen)  # the clip changed the gradient
    np.testing.assert_allclose(series(run_dir, "grad_norm")[1], [s["pre"] for s in seen], rtol=1e-5)
    post = series(run_dir, "grad_norm_clipped")[1]
    np.testing.assert_allclose(post, [s["post"] for s in seen], rtol=1e-5)


@pytest.mark.parametrize("every", [1, 3, None])
def test_block_update_and_weight_norms_on_their_steps(run_dir, every):
    model, batches, loss_fn = gpt_and_batches(depth=3)
    options = {} if every is None else {"step_updates_every": every}
    seen = run_script(model, batches, loss_fn, run_dir, **options)
    # The blocks are known from the first recorded step's trace: from step 1 on; then the
    # recorded steps (0, 1) and every ``every``-th step (10 by default).
    stride = every or 10
    want_steps = [s for s in range(1, STEPS) if s < 2 or s % stride == 0]
    for block in ("blocks.0", "blocks.2"):
        names = [n for n, _ in model.named_parameters() if n.startswith(block + ".")]
        want_w = [
            np.sqrt(sum(seen[s]["before"][n].double().pow(2).sum().item() for n in names))
            for s in want_steps
        ]
        want_u = [
            np.sqrt(
                sum(
                    (seen[s]["after"][n] - seen[s]["before"][n]).double().pow(2).sum().item()
                    for n in names
                )
            )
            for s in want_steps
        ]
        steps, weight = series(run_dir, "block_param_norm", block)
        assert steps.tolist() == want_steps
        np.testing.assert_allclose(weight, want_w, rtol=1e-5)
        _, update = series(run_dir, "block_update_norm", block)
        np.testing.assert_allclose(update, want_u, rtol=1e-4)
        _, ratio = series(run_dir, "block_update_ratio", block)
        np.testing.assert_allclose(ratio, np.array(want_u) / want_w, rtol=1e-4)


def test_training_is_bit_identical_with_and_without_the_recorder(run_dir):
    model_a, batches, loss_fn = gpt_and_batches()
    model_b, _, _ = gpt_and_batches()
    plain = run_script(model_a, batches, loss_fn)
    recorded = run_script(model_b, batches, loss_fn, run_dir)
    assert [s["returned"] for s in plain] == [s["returned"] for s in recorded]
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


def test_closing_the_run_gives_torch_its_functions_back(run_dir):
    originals = (
        clip_grad_module._clip_grads_with_norm_,
        torch.nn.utils.clip_grad_value_,
        torch.autograd.grad,
    )

    def current():
        return (
            clip_grad_module._clip_grads_with_norm_,
            torch.nn.utils.clip_grad_value_,
            torch.autograd.grad,
        )

    rec = stabscope.Recorder(gpt_and_batches()[0], run_dir).start()
    assert current()[0] is not originals[0] and current()[2] is not originals[2]
    rec.close()
    assert current() == originals
    assert not clip_sites._listeners


def test_block_updates_off_above_the_size_limit(run_dir, monkeypatch):
    monkeypatch.setattr("stabscope.record.step_norms.MAX_COPIED", 10)
    model, batches, loss_fn = gpt_and_batches()
    run_script(model, batches, loss_fn, run_dir)
    assert series(run_dir, "block_update_norm", "blocks.0")[0].size == 0
    assert series(run_dir, "grad_norm")[0].size == STEPS
    notes = stabscope.read_meta(run_dir)["notes"]
    assert any("block update norms every step are off" in n for n in notes)


def test_a_second_clip_of_the_same_gradients_is_measured_after_both(run_dir):
    """Two ``clip_grad_norm_`` calls a step (the second tighter): the norm the optimizer
    receives is the second clip's, not the first clip's total times its factor."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    received = []
    with stabscope.Recorder(model, run_dir, preset="cheap") as rec:
        for _ in range(STEPS):
            x = torch.randn(32, 8)
            loss = (model(x) - 5.0).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            clip_grad_norm_(model.parameters(), 1.0)
            clip_grad_norm_(model.parameters(), 0.1)
            received.append(total_norm(model))
            opt.step()
            rec.step(loss=loss)
    assert all(r < 0.1 + 1e-6 for r in received)  # the second clip acted at every step
    steps, post = series(run_dir, "grad_norm_clipped")
    assert steps.tolist() == list(range(STEPS))
    np.testing.assert_allclose(post, received, rtol=1e-5)


class _ClipInsideSGD(torch.optim.SGD):
    """SGD whose ``step`` clips first (clipping without touching the training loop): the clip
    runs after the optimizer's step pre-hook. Keeps what the clip saw and what the update used."""

    def __init__(self, params, max_norm: float, **kw) -> None:
        super().__init__(params, **kw)
        self.max_norm, self.returned, self.used = max_norm, [], []

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        self.returned.append(clip_grad_norm_(params, self.max_norm).item())
        self.used.append(torch.cat([p.grad.double().flatten() for p in params]).norm().item())
        return super().step(closure)


def test_a_clip_inside_optimizer_step_is_measured_after_it(run_dir):
    """The norm after the clip is that of the gradients the update used, not the unclipped
    norm the step's pre-hook saw before ``step`` clipped them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = _ClipInsideSGD(model.parameters(), 0.05, lr=1e-2)
    with stabscope.Recorder(model, run_dir, preset="cheap") as rec:
        for _ in range(STEPS):
            loss = (model(torch.randn(32, 8)) - 5.0).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    assert all(r > 10 * 0.05 for r in opt.returned)  # the clip acted at every step
    steps, pre = series(run_dir, "grad_norm")
    assert steps.tolist() == list(range(STEPS))
    np.testing.assert_allclose(pre, opt.returned, rtol=1e-5)
    steps, post = series(run_dir, "grad_norm_clipped")
    assert steps.tolist() == list(range(STEPS))
    np.testing.assert_allclose(post, opt.used, rtol=1e-5)


def test_a_step_the_script_skipped_leaves_its_clip_out(run_dir):
    """A spike guard: clip, and on a bad batch throw the gradients away and go on without a
    step. The step's grad_norm is the clip of the gradients the step received, not the clip
    of the batch the script dropped (with either kind of zero_grad)."""
    model, batches, loss_fn = gpt_and_batches()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rec = stabscope.Recorder(model, run_dir, preset="cheap", schedule=Schedule(2, 0)).start()
    used, dropped = [], []
    for i, batch in enumerate(batches[:9]):
        loss_fn(model, batch).backward()
        norm = clip_grad_norm_(model.parameters(), MAX_NORM).item()
        if i % 3 == 1:  # a "bad" batch: skipped
            dropped.append(norm)
            opt.zero_grad(set_to_none=i % 2 == 0)
            continue
        used.append(norm)
        opt.step()
        opt.zero_grad(set_to_none=i % 2 == 0)
        rec.step()
    rec.close()
    assert min(abs(a - b) for a, b in zip(used[1:], dropped)) > 1e-3  # told apart
    np.testing.assert_allclose(series(run_dir, "grad_norm")[1], used, rtol=1e-6)


def test_without_a_clip_the_norm_covers_tensors_stepped_beside_the_model(run_dir):
    """A learnable temperature outside the model, stepped by the same optimizer: the norm of
    every gradient ``optimizer.step()`` received, as a clip over the same tensors returns."""
    model, batches, loss_fn = gpt_and_batches()
    temperature = torch.nn.Parameter(torch.tensor(1.5))
    opt = torch.optim.Adam([*model.parameters(), temperature], lr=1e-2)
    rec = stabscope.Recorder(model, run_dir, preset="cheap", schedule=Schedule(2, 0)).start()
    want, model_only = [], []
    for batch in batches[:4]:
        (loss_fn(model, batch) * temperature).backward()
        want.append(math.hypot(total_norm(model), temperature.grad.item()))
        model_only.append(total_norm(model))
        opt.step()
        opt.zero_grad()
        rec.step()
    rec.close()
    assert min(w - m for w, m in zip(want, model_only)) > 1e-3 * max(want)  # it counts
    np.testing.assert_allclose(series(run_dir, "grad_norm")[1], want, rtol=1e-5)
