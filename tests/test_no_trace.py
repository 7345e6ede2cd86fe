"""After the recorder exits, normally or by an exception, the model carries no hooks and
training is bit-identical to an unrecorded run with the same seed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.modules.module as module_globals
import torch.optim.optimizer as optimizer_globals

import stabscope
from stabscope import Schedule
from tests.conftest import batch_maker, mlp, train


def hook_count(model: torch.nn.Module) -> int:
    per_module = sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(m._backward_pre_hooks)
        + len(m._forward_hooks_with_kwargs)
        for m in model.modules()
    )
    global_hooks = (
        len(module_globals._global_forward_hooks)
        + len(module_globals._global_backward_hooks)
        + len(optimizer_globals._global_optimizer_pre_hooks)
        + len(optimizer_globals._global_optimizer_post_hooks)
    )
    tensor_hooks = sum(len(p._backward_hooks or {}) for p in model.parameters())
    return per_module + global_hooks + tensor_hooks


def run(recorded: bool, run_dir, fail_at: int | None = None, keep: list | None = None):
    torch.manual_seed(123)
    model = mlp(inplace=True)
    if keep is not None:
        keep.append(model)
    make = batch_maker(6, 3, seed=5)
    if not recorded:
        train(model, 12, make)
        return model
    with stabscope.Recorder(model, run_dir, schedule=Schedule(dense=3, every=4)) as rec:

        def before_step(step: int) -> None:
            if step == fail_at:
                raise RuntimeError("user code failed")
            assert hook_count(model) > 0 or not rec.recording

        train(model, 12, make, rec, before_step=before_step)
    return model


def test_bit_identical_and_no_hooks_after_exit(tmp_path):
    plain = run(False, None)
    recorded = run(True, tmp_path / "a")
    assert hook_count(recorded) == 0
    for (name, p), q in zip(plain.named_parameters(), recorded.parameters()):
        assert torch.equal(p, q), name
    x = torch.randn(5, 6)
    assert torch.equal(plain(x), recorded(x))


def test_no_hooks_after_exception(tmp_path):
    keep: list = []
    with pytest.raises(RuntimeError, match="user code failed"):
        run(True, tmp_path / "b", fail_at=2, keep=keep)  # step 2 is recorded: hooks attached
    assert hook_count(keep[0]) == 0
    meta = stabscope.read_meta(tmp_path / "b")
    assert meta["status"] == "failed"
    assert meta["error"]["message"] == "user code failed"
    assert sorted(stabscope.load_run(tmp_path / "b", metrics="loss").step) == [0, 1]


def test_exception_leaves_model_clean(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    with pytest.raises(ValueError), stabscope.Recorder(model, tmp_path / "c"):
        model(torch.randn(2, 6)).sum().backward()
        raise ValueError("boom")
    assert hook_count(model) == 0
    train(model, 1, batch_maker(6, 3))  # still trains normally
