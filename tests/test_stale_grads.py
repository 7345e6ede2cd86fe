"""Gradients never zeroed between optimizer steps: a real training loop without zero_grad is
an error at its second step, read from the gradient tensor itself; every way of zeroing
(set_to_none either way, the model's zero_grad, ``grad = None``, in place by hand),
gradient accumulation, a clip and a closure optimizer are not."""

from __future__ import annotations

import pytest
import torch

import stabscope
from stabscope import Schedule
from stabscope.rules import check_run
from tests.conftest import mlp

STEPS = 6


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)) for _ in range(8)]


def zeroing(how: str, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    if how == "set_to_none":
        opt.zero_grad(set_to_none=True)
    elif how == "in_place":
        opt.zero_grad(set_to_none=False)
    elif how == "model":
        model.zero_grad()
    elif how == "none_by_hand":
        for p in model.parameters():
            p.grad = None
    elif how == "zero_by_hand":
        for p in model.parameters():
            if p.grad is not None:
                p.grad.zero_()


def train(
    run, how: str, accumulate: int = 1, clip: bool = False, logging: bool = False
) -> list[float]:
    """An MLP regression under Adam; ``how`` zeroes the gradients after each step ("never":
    not at all); ``logging``: after each step and before that zeroing, one more backward
    whose gradient norm the loop reads (a logging pass). Returns the norm of the gradient
    each step received, measured here."""
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = batches()
    norms = []
    with stabscope.Recorder(model, run, schedule=Schedule(dense=2, every=0)) as rec:
        for step in range(STEPS):
            for micro in range(accumulate):
                x, y = data[(step * accumulate + micro) % len(data)]
                loss = (model(x) - y).pow(2).mean() / accumulate
                loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            norms.append(torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item())
            opt.step()
            if logging:
                (model(x) - y).pow(2).mean().backward()
                torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
            zeroing(how, model, opt)
            rec.step(loss=loss)
    return norms


def findings(run) -> dict:
    return {f.rule: f for f in check_run(run).findings}


@pytest.mark.parametrize("accumulate", [1, 3])
def test_a_loop_that_never_zeroes_is_an_error_at_its_second_step(tmp_path, accumulate):
    norms = train(tmp_path / "r", "never", accumulate)
    f = findings(tmp_path / "r")["gradients-not-zeroed"]
    assert (f.severity, f.step, f.module) == ("error", 1, "__run__")
    assert f"{STEPS - 2} more such steps" in f.message
    flags = stabscope.load_run(tmp_path / "r", metrics=["grad_not_zeroed"])
    assert sorted(flags.step) == list(range(1, STEPS)) and set(flags.value) == {1.0}
    # What it does to the steps: each one's gradient carries every earlier one.
    assert norms[-1] > 2 * norms[0]


@pytest.mark.parametrize(
    "how", ["set_to_none", "in_place", "model", "none_by_hand", "zero_by_hand"]
)
def test_every_way_of_zeroing_is_seen(tmp_path, how):
    train(tmp_path / "r", how, accumulate=2, clip=True)
    assert "gradients-not-zeroed" not in findings(tmp_path / "r")
    assert stabscope.load_run(tmp_path / "r", metrics=["grad_not_zeroed"]).empty


def test_a_backward_between_steps_that_is_zeroed_before_the_next_is_not_stale(tmp_path):
    """A logging pass after the step adds onto the step's gradients; the loop zeroes them
    before the next step, which receives fresh ones: no finding. The same pass in a loop
    that never zeroes still is one."""
    train(tmp_path / "ok", "set_to_none", logging=True)
    assert "gradients-not-zeroed" not in findings(tmp_path / "ok")
    train(tmp_path / "never", "never", logging=True)
    assert findings(tmp_path / "never")["gradients-not-zeroed"].severity == "error"


def test_a_closure_optimizer_that_zeroes_in_its_closure(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    x, y = batches()[0]

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    with stabscope.Recorder(model, tmp_path / "r", schedule=Schedule(dense=2, every=0)) as rec:
        for _ in range(4):
            rec.step(loss=opt.step(closure))
    assert "gradients-not-zeroed" not in findings(tmp_path / "r")


def test_a_tensor_torch_takes_no_such_hook_on_is_left_unwatched():
    from stabscope.record.stale_grads import StaleGradients

    leaf = torch.zeros(3, requires_grad=True)
    watch = StaleGradients.watching(leaf)
    assert watch is not None
    watch.release()
    assert StaleGradients.watching(leaf * 2) is None  # not a leaf: torch refuses the hook


def test_the_watch_is_on_the_model_only_while_the_run_is_open(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    first = next(model.parameters())

    def hooks() -> int:
        return len(first._post_accumulate_grad_hooks or {})

    rec = stabscope.Recorder(model, tmp_path / "r")  # made, not opened: nothing on the model
    assert hooks() == 0
    rec.start()
    assert hooks() == 1
    rec.close()
    assert hooks() == 0


@pytest.mark.parametrize("zeroed", ["both", "first_only", "second_only"])
def test_two_optimizers_each_zeroed_or_not(tmp_path, zeroed):
    """The body under SGD and the head under Adam (Muon's matrices beside AdamW's
    embeddings), one zero_grad per optimizer: a loop that zeroes only one of them hands the
    other's parameters every earlier gradient. Whichever is left, the step that received
    them is an error from the second step on; zeroing both is clean. The reference: each
    parameter's own gradient, checked here to carry the earlier ones."""
    torch.manual_seed(0)
    model = mlp()
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    opts = [torch.optim.SGD(first, lr=1e-2), torch.optim.Adam(second, lr=1e-2)]
    zero = {"both": opts, "first_only": opts[:1], "second_only": opts[1:]}[zeroed]
    data = batches()
    left = second[0] if zeroed == "first_only" else first[0]
    seen = []
    with stabscope.Recorder(model, tmp_path, schedule=Schedule(dense=2, every=0)) as rec:
        for step in range(STEPS):
            x, y = data[step % len(data)]
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            seen.append(left.grad.detach().clone())
            for opt in opts:
                opt.step()
            for opt in zero:
                opt.zero_grad()
            rec.step(loss=loss)
    found = findings(tmp_path).get("gradients-not-zeroed")
    if zeroed == "both":
        assert found is None
        return
    assert not torch.equal(seen[1], seen[0]) and (seen[1] - seen[0]).norm() < seen[1].norm()
    assert found is not None and (found.severity, found.step) == ("error", 1)
