"""`stabscope summary`'s largest and smallest modules: each module listed once, in the order
of the recorded values at the first recorded step (load_run's rows are the reference)."""

from __future__ import annotations

import torch

import stabscope
from stabscope.analysis.summary import summarize
from tests.conftest import batch_maker, mlp, train


def record(run_dir):
    torch.manual_seed(0)
    model = mlp()  # five modules: three Linear, ReLU, Tanh
    with stabscope.Recorder(model, run_dir) as rec:
        train(model, 3, batch_maker(6, 3), rec)
    return run_dir


def reference(run_dir) -> list[tuple[str, float]]:
    """(module, grad_rms) at the first recorded step, largest first."""
    df = stabscope.load_run(run_dir, metrics="grad_rms", phase="train")
    df = df[~df.module.isin(["<root>", "__run__"])]
    at = df[df.step == df.step.min()].groupby("module", observed=True).value.max()
    return [(str(k), float(v)) for k, v in at.sort_values(ascending=False).items()]


def test_a_model_with_few_modules_lists_each_once(tmp_path):
    run = record(tmp_path / "run")
    want = reference(run)
    assert len(want) == 5
    s = summarize(run, top=3)  # 3 largest, then the 2 left as smallest, smallest first
    assert s.largest == want[:3]
    assert s.smallest == want[3:][::-1]
    s = summarize(run, top=5)  # every module is among the largest: none left for smallest
    assert s.largest == want and s.smallest == []
    s = summarize(run, top=2)
    assert s.largest == want[:2] and s.smallest == want[-2:][::-1]
