"""The Parquet run store: round trip, filters, rolling parts, corrupt parts, direct readers."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from stabscope.store import (
    SCHEMA,
    NotARunError,
    PartWriter,
    StabscopeWarning,
    load_run,
    new_meta,
    part_files,
    save_meta,
)


def write_synthetic(run_dir, steps=50, modules=("a.0", "a.1", "b"), part_rows=100):
    """Rows value = step * 10 + module position, so any row can be checked by formula."""
    save_meta(run_dir, new_meta(modules=[{"name": m} for m in modules], parameters=[]))
    w = PartWriter(run_dir, part_rows=part_rows, flush_seconds=1e9)
    mcodes = np.array([w.modules(m) for m in modules])
    peak = 0
    for step in range(steps):
        n = len(modules)
        w.append(
            np.full(n, step),
            np.full(n, w.phases("train")),
            mcodes,
            np.zeros(n),
            np.full(n, w.metrics("act_rms")),
            np.full(n, -1),
            step * 10 + np.arange(n, dtype=np.float32),
        )
        peak = max(peak, w.buffered_rows)
    w.flush()
    return w, peak


def test_round_trip_types_and_values(run_dir):
    write_synthetic(run_dir)
    df = load_run(run_dir)
    assert len(df) == 150
    table = pq.read_table(part_files(run_dir)[0])
    assert table.schema.equals(SCHEMA, check_metadata=False)
    pos = df.module.astype(str).map({"a.0": 0, "a.1": 1, "b": 2})
    np.testing.assert_array_equal(df.value, df.step * 10 + pos)
    assert isinstance(df.module.dtype, pd.CategoricalDtype)


def test_parts_roll_and_memory_is_bounded(run_dir):
    writer, peak = write_synthetic(run_dir, steps=100, part_rows=30)
    assert peak < 30  # the buffer never holds a full part: it is flushed as soon as it does
    assert writer.parts_written == len(part_files(run_dir)) == 10
    assert len(load_run(run_dir)) == 300


def test_filters_read_only_what_was_asked(run_dir):
    write_synthetic(run_dir)
    assert set(load_run(run_dir, modules="a.*").module.astype(str)) == {"a.0", "a.1"}
    assert sorted(load_run(run_dir, steps=range(3, 6)).step.unique()) == [3, 4, 5]
    assert sorted(load_run(run_dir, steps=[1, 7]).step.unique()) == [1, 7]
    assert sorted(load_run(run_dir, steps=slice(48, None)).step.unique()) == [48, 49]
    one = load_run(run_dir, modules=["b"], steps=4)
    assert one.value.tolist() == [42.0]
    assert load_run(run_dir, metrics="nope").empty


def test_corrupt_and_temporary_parts_are_skipped(run_dir):
    write_synthetic(run_dir, part_rows=30)
    parts = part_files(run_dir)
    parts[-1].write_bytes(parts[-1].read_bytes()[:50])  # truncated, as by a crash mid-write
    (run_dir / "parts" / ".part-000099.parquet.tmp").write_bytes(b"partial")
    with pytest.warns(StabscopeWarning, match="skipping unreadable part"):
        df = load_run(run_dir)
    assert len(df) == 150 - 30


def test_not_a_run(tmp_path):
    with pytest.raises(NotARunError, match="not a stabscope run"):
        load_run(tmp_path)


def test_pandas_and_pyarrow_read_parts_directly(run_dir):
    write_synthetic(run_dir, part_rows=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        direct = pd.read_parquet(run_dir / "parts")
    assert len(direct) == 150
    assert direct.value.sum() == load_run(run_dir).value.sum()


def test_meta_is_strict_json_even_with_nan(run_dir):
    import json

    save_meta(run_dir, new_meta(run={"lr": float("nan")}))
    json.loads((run_dir / "meta.json").read_text(), parse_constant=lambda c: pytest.fail(c))


@pytest.mark.parametrize("rank", [0, 1])
def test_a_writer_reopened_on_its_parts_numbers_after_them(run_dir, rank):
    """A rank's parts are numbered in its own block (rank 1 from 10,000,000: eight digits);
    a writer opened where that rank's parts already are writes after them and overwrites
    none, whatever the width of the number."""
    rows = []
    for _ in range(2):
        w = PartWriter(run_dir, rank=rank, flush_seconds=1e9)
        w.append(
            np.array([len(rows)]),
            np.array([w.phases("train")]),
            np.array([w.modules("m")]),
            np.zeros(1),
            np.array([w.metrics("loss")]),
            np.array([-1]),
            np.array([float(len(rows))], np.float32),
        )
        rows.append(w.flush())
    assert rows[0] != rows[1] and all(p.exists() for p in rows)
    assert sorted(load_run(run_dir).value) == [0.0, 1.0]
