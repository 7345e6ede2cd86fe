"""The report's aggregation against closed-form values, on runs written through the real store."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import stabscope
from stabscope import Schedule
from stabscope.report.aggregate import step_bins, take_census
from stabscope.report.data import Budget, census_of, collect
from stabscope.report.rowbins import row_bins, span_label
from stabscope.report.runs import open_run
from stabscope.store import SCHEMA
from stabscope.store.schema import PARQUET_OPTIONS
from tests.report_runs import HEADS, VALUES, write_run


def collected(run_dir, budget=Budget()):
    run = open_run(run_dir, "r")
    census = census_of(run)
    return collect(run, census, budget)


def test_step_bins_equal_counts_and_lookup():
    steps = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 25, 50, 75, 100])
    bins = step_bins(steps, 4)
    # 14 recorded steps in 4 bins of 3, 4, 3, 4 (cut at 14*k//4 = 3, 7, 10)
    assert bins.first.tolist() == [0, 3, 7, 25]
    assert bins.last.tolist() == [2, 6, 9, 100]
    assert [int(bins.of_step[s]) for s in steps] == [0] * 3 + [1] * 4 + [2] * 3 + [3] * 4
    assert bins.of_step[10] == -1  # a step that was not recorded belongs to no bin
    assert len(step_bins(steps, 100)) == len(steps)  # never more bins than steps


def test_row_bins_never_cross_groups_and_label_ranges():
    attn = [f"blocks.{i}.attn" for i in range(10)]
    mlp = [f"blocks.{i}.mlp" for i in range(10)]
    rows = row_bins([attn, mlp], 4)
    assert rows.labels == ["blocks.0–4.attn", "blocks.5–9.attn", "blocks.0–4.mlp", "blocks.5–9.mlp"]
    row_of = rows.row_of()
    assert row_of["blocks.4.attn"] == 0 and row_of["blocks.5.attn"] == 1
    assert row_of["blocks.0.mlp"] == 2
    assert span_label("a.x", "b.y") == "a.x … b.y"
    assert row_bins([attn], 20).labels == attn


def test_loss_spike_survives_downsampling_as_exact_max(tmp_path):
    spike_step, spike = 137, 1000.0

    def loss(s):
        return spike if s == spike_step else 2.0 + s / 1000

    write_run(tmp_path / "r", layers=1, steps=[0, 399], metrics=[], loss=loss)
    data = collected(tmp_path / "r", Budget(points=50))
    grid = data.series["loss"]
    assert grid.hi.shape == (1, 50)
    b = int(np.flatnonzero((grid.first <= spike_step) & (grid.last >= spike_step))[0])
    assert grid.hi[0, b] == spike  # float32 1000.0 is exact
    # 400 steps in 50 bins of 8: the spike's bin holds steps 136..143
    members = np.arange(grid.first[b], grid.last[b] + 1)
    assert members.tolist() == list(range(136, 144))
    others = [2.0 + s / 1000 for s in members if s != spike_step]
    assert grid.lo[0, b] == pytest.approx(min(others), rel=1e-6)
    expected_mean = (sum(others) + spike) / len(members)
    assert grid.mean[0, b] == pytest.approx(expected_mean, rel=1e-6)
    # a bin without the spike: the mean is the mean of the closed form
    assert grid.mean[0, 0] == pytest.approx(np.mean([2.0 + s / 1000 for s in range(8)]), rel=1e-6)


def test_heatmap_cells_are_the_known_values(tmp_path):
    steps = [*range(10), 25, 50]
    write_run(tmp_path / "r", layers=4, steps=steps)
    data = collected(tmp_path / "r")
    grid = data.heat["act_rms"]
    assert grid.rows == [f"blocks.{i}" for i in range(4)]
    assert grid.first.tolist() == steps
    f = VALUES["act_rms"][1]
    expected = np.array([[f(i, s, 0) for s in steps] for i in range(4)])
    np.testing.assert_allclose(grid.hi, expected, rtol=1e-6)
    np.testing.assert_allclose(grid.lo, expected, rtol=1e-6)
    # layer norms from the tensors' norms: sqrt(3² + 4²)(i+1) = 5(i+1); update ratio 0.05/5
    np.testing.assert_allclose(data.heat["param_norm"].hi[:, 0], [5, 10, 15, 20], rtol=1e-6)
    np.testing.assert_allclose(data.heat["update_ratio"].hi, 0.01, rtol=1e-5)
    # entropy: the lowest head colours the cell; heads share a row
    ent = data.heat["attn_entropy"]
    assert ent.rows == [f"blocks.{i}.attn" for i in range(4)]
    fe = VALUES["attn_entropy"][1]
    np.testing.assert_allclose(ent.lo[:, 0], fe(0, 0, HEADS - 1), rtol=1e-6)
    np.testing.assert_allclose(ent.hi[:, 0], fe(0, 0, 0), rtol=1e-6)


def test_merged_rows_and_steps_keep_the_envelope(tmp_path):
    write_run(tmp_path / "r", layers=12, steps=range(40), metrics=["act_rms", "grad_rms"])
    data = collected(tmp_path / "r", Budget(rows=3, cells=60, cols=20))
    grid = data.heat["grad_rms"]
    assert grid.rows == ["blocks.0–3", "blocks.4–7", "blocks.8–11"]
    assert grid.hi.shape == (3, 20)  # 60 cells / 3 rows
    f = VALUES["grad_rms"][1]
    for r, layers in enumerate([range(0, 4), range(4, 8), range(8, 12)]):
        for c in range(20):
            cell = [f(i, s, 0) for i in layers for s in range(grid.first[c], grid.last[c] + 1)]
            assert grid.hi[r, c] == pytest.approx(max(cell), rel=1e-6)
            assert grid.lo[r, c] == pytest.approx(min(cell), rel=1e-6)
            assert grid.mean[r, c] == pytest.approx(np.mean(cell), rel=1e-5)


def test_profiles_and_heads_at_picked_steps(tmp_path):
    steps = [*range(10), 25, 50, 75]
    write_run(tmp_path / "r", layers=3, steps=steps)
    data = collected(tmp_path / "r")
    at = data.profiles["grad_rms"]
    # the first recorded step, then every third of the 13 recorded ones: positions 0, 4, 8, 12
    assert at.steps == [0, 4, 8, 75]
    f = VALUES["grad_rms"][1]
    expected = [[f(i, s, 0) for s in at.steps] for i in range(3)]
    np.testing.assert_allclose(at.values[:, 0, :], expected, rtol=1e-6)
    heads = data.heads
    fe = VALUES["attn_entropy"][1]
    assert heads.values.shape == (3, HEADS, 3)
    for j, s in enumerate(heads.steps):
        np.testing.assert_allclose(
            heads.values[1, :, j], [fe(1, s, h) for h in range(HEADS)], rtol=1e-6
        )
    beta = data.beta
    np.testing.assert_allclose(beta.values[2, :, 0], [1.0, 0.5, 1 / 3], rtol=1e-6)


def test_nonfinite_values_are_counted_not_drawn(tmp_path):
    def loss(s):
        return math.nan if s in (3, 4) else (math.inf if s == 7 else 1.0)

    write_run(tmp_path / "r", layers=1, steps=[0, 9], metrics=[], loss=loss)
    data = collected(tmp_path / "r")
    steps, counts = data.nonfinite["loss"]
    assert steps.tolist() == [3, 4, 7] and counts.tolist() == [1, 1, 1]
    grid = data.series["loss"]
    assert np.isnan(grid.mean[0, 3]) and np.nanmax(grid.hi) == 1.0


def _write_part(path, rows, modules_dictionary):
    """A part whose module dictionary is in the given order, unlike the writer's."""
    codes = [modules_dictionary.index(m) for m, _, _ in rows]
    n = len(rows)
    table = pa.Table.from_arrays(
        [
            pa.array([s for _, s, _ in rows], pa.int32()),
            pa.array(np.zeros(n, np.int16)),
            pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array(["train"])),
            pa.DictionaryArray.from_arrays(
                pa.array(codes, pa.int32()), pa.array(modules_dictionary)
            ),
            pa.array(np.zeros(n, np.int16)),
            pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array(["act_rms"])),
            pa.array(np.full(n, -1, np.int16)),
            pa.array([v for _, _, v in rows], pa.float32()),
        ],
        schema=SCHEMA,
    )
    pq.write_table(table, path, **PARQUET_OPTIONS)


def test_parts_with_different_dictionaries(tmp_path):
    run = write_run(tmp_path / "r", layers=2, steps=[0], metrics=["act_rms"])
    # two more parts with the module dictionary in opposite orders
    _write_part(
        run / "parts/part-000100.parquet",
        [("blocks.0", 1, 10.0), ("blocks.1", 1, 11.0)],
        ["blocks.0", "blocks.1"],
    )
    _write_part(
        run / "parts/part-000101.parquet",
        [("blocks.0", 2, 20.0), ("blocks.1", 2, 21.0)],
        ["blocks.1", "blocks.0"],
    )
    census = take_census(open_run(run, "r").files)
    assert census.steps("act_rms").tolist() == [0, 1, 2]
    grid = collected(run).heat["act_rms"]
    f = VALUES["act_rms"][1]
    np.testing.assert_allclose(grid.hi, [[f(0, 0, 0), 10, 20], [f(1, 0, 0), 11, 21]], rtol=1e-6)


def test_a_step_marked_first_nonfinite_twice_is_listed_once(tmp_path):
    """A bias that is NaN from the start: every step's forward is non-finite. Step 1 is
    marked by its recorded step and by the flight recorder (whose first step it is): the
    report's table of first non-finite modules lists each step and module once."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    with torch.no_grad():
        model[2].bias.fill_(float("nan"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stabscope.Recorder(model, tmp_path / "run", schedule=Schedule(dense=3, every=0)) as rec:
        for _ in range(4):
            x = torch.randn(8, 4)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    rows = stabscope.load_run(tmp_path / "run", metrics="first_nonfinite_forward")
    pairs = list(zip(rows.step.tolist(), rows.module.astype(str)))
    # Step 0: the NaN bias's layer; from step 1 on the first layer's weights are NaN too
    # (step 0's update). Step 1 carries the recorded step's marker and the flight recorder's.
    assert sorted(pairs) == [(0, "2"), (1, "0"), (1, "0"), (2, "0")]
    listed = collected(tmp_path / "run").markers["first_nonfinite_forward"]
    assert sorted(listed) == [(0, "2"), (1, "0"), (2, "0")]
