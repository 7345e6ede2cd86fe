"""Every rule on runs whose recorded values went non-finite in the ways diverged runs do: the
last recorded step all NaN or all Inf, everything NaN from the middle on, every other metric
NaN throughout, the run-level series NaN, scattered -Inf. A rule that raises fails the gate
for the tool's sake, not the model's (``weight-decay-dominance`` once raised IndexError on a
run whose last weights were all NaN): none may. The runs are real ones (a zero-code MLP under
AdamW whose weight decay the rules read, so the decay rule reaches its weight norms; and under
SGD clipped at every step, so clip-throttles reads its norms), rewritten part by part in real
Parquet."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stabscope.drivers.zerocode import profile_training_script
from stabscope.record.config import RecorderConfig
from stabscope.record.schedule import Schedule
from tests.rule_runs import checked

SCRIPT = """
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 4))
{optimizer}
for step in range(40):
    x = torch.randn(16, 8)
    loss = nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0))
    opt.zero_grad()
    loss.backward()
    {clip}
    opt.step()
"""
#: AdamW whose decay the decay rule reads (0.05 a step), and clipped SGD (clip-throttles).
LOOPS = {
    "adamw-decay": ("opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=1.0)", ""),
    "sgd-clipped": (
        "opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)",
        "nn.utils.clip_grad_norm_(model.parameters(), 0.01)",
    ),
}

PATTERNS = [
    "last-nan",
    "last-inf",
    "nan-from-middle",
    "even-metrics-nan",
    "odd-metrics-nan",
    "run-level-nan",
    "scattered-neg-inf",
]


@pytest.fixture(scope="module", params=sorted(LOOPS))
def source_run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    script = root / "train.py"
    optimizer, clip = LOOPS[request.param]
    script.write_text(SCRIPT.format(optimizer=optimizer, clip=clip))
    config = RecorderConfig(preset="full", schedule=Schedule(dense=5, every=5))
    run = root / "run"
    profile_training_script(script, [], run, config, budget=40)
    return run


def poison(run, pattern: str) -> int:
    """Rewrite every part of ``run`` with ``pattern``'s non-finite values; how many."""
    parts = sorted((run / "parts").glob("*.parquet"))
    steps = np.concatenate([pq.read_table(p, columns=["step"])["step"].to_numpy() for p in parts])
    last, middle = steps.max(), (steps.min() + steps.max()) // 2
    rng = np.random.default_rng(0)
    metrics: set[str] = set()
    for p in parts:
        metrics |= set(pq.read_table(p, columns=["metric"])["metric"].to_pylist())
    ordered = sorted(metrics)
    poisoned = 0
    for p in parts:
        table = pq.read_table(p)
        value = table["value"].to_numpy(zero_copy_only=False).copy()
        step = table["step"].to_numpy()
        metric = np.array(table["metric"].to_pylist())
        module = np.array(table["module"].to_pylist())
        where = {
            "last-nan": step == last,
            "last-inf": step == last,
            "nan-from-middle": step >= middle,
            # Every other metric by name: of two metrics read together (grad_norm and
            # grad_norm_clipped) one is all NaN and the other not, in one parity or the other.
            "even-metrics-nan": np.isin(metric, ordered[0::2]),
            "odd-metrics-nan": np.isin(metric, ordered[1::2]),
            "run-level-nan": module == "__run__",  # loss, gradient norms, lr: all NaN
            "scattered-neg-inf": rng.random(len(value)) < 0.05,
        }[pattern]
        value[where] = {"last-inf": np.inf, "scattered-neg-inf": -np.inf}.get(pattern, np.nan)
        poisoned += int(where.sum())
        column = table.schema.get_field_index("value")
        field = table.schema.field("value")
        table = table.set_column(column, field, pa.array(value, type=field.type))
        pq.write_table(table, p)
    return poisoned


@pytest.mark.slow
@pytest.mark.parametrize("pattern", PATTERNS)
def test_no_rule_raises_on_non_finite_values(source_run, tmp_path, pattern):
    run = tmp_path / "run"
    shutil.copytree(source_run, run)
    assert poison(run, pattern) > 0
    checked(run)  # asserts that no rule raised
