"""Live bridges (``Recorder(log_to=...)``): the curated series arrive in TensorBoard while the
run trains, read back with TensorBoard's own reader, equal to the run table's numbers; the
findings as text with their remedies; a 32-layer model stays under the cap; a dashboard that
fails mid-run warns once and loses no Parquet row; bad targets are one line with a hint."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import stabscope
from stabscope.errors import StabscopeWarning, UsageError
from stabscope.export.series import BLOCK_SERIES, RUN_METRICS
from stabscope.store import count_rows, load_meta, load_run
from tests.conftest import record_steps, sample_gpt

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

STEPS = 13


def read_back(out: Path) -> EventAccumulator:
    acc = EventAccumulator(str(out), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def train_gpt(
    run: Path,
    steps: int = STEPS,
    depth: int = 3,
    lr: float = 3e-2,
    nan_at: int | None = None,
    **options,
):
    """``nan_at``: the loss handed to the recorder at that step is NaN, a finding judged on
    the training thread at once (the worker's checks of landed parts may or may not finish
    inside a short run)."""
    model, forward = sample_gpt("post", depth=depth)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    cfg = stabscope.RecorderConfig(schedule=stabscope.Schedule(3, 5), flight_every=4)
    with stabscope.Recorder(model, run, cfg, forward=forward, **options) as rec:
        for step in range(steps):
            loss = forward(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss if step != nan_at else torch.tensor(math.nan))
    return rec


def live_expected(frame, tag: str) -> tuple[list[int], np.ndarray]:
    """What ``tag`` holds per step, from the run table: a block's every-step (flight) value
    where that step has one, else the scheduled one (the live rule: the preferred source a
    step has)."""
    name, _, block = tag.partition("/")
    own = frame.module == block
    owned = frame.module.str.startswith(f"{block}.")

    def first(mask):
        return frame[mask].groupby("step").value.first()

    def preferred(*series):
        out = series[-1]
        for s in reversed(series[:-1]):
            out = s.combine_first(out)
        return out

    def rss(metric):
        rows = frame[owned & (frame.metric == metric)]
        return np.sqrt((rows.value.astype(np.float64) ** 2).groupby(rows.step).sum())

    if name in RUN_METRICS:
        by = first((frame.metric == name) & (frame.module == "__run__") & (frame["index"] <= 0))
    elif name in ("act_rms", "grad_rms"):
        by = preferred(
            first(own & (frame.metric == f"flight_{name}")), first(own & (frame.metric == name))
        )
    elif name == "param_grad_norm":
        by = rss("param_grad_norm")
    elif name == "update_ratio":
        ratio = rss("update_norm") / rss("param_norm")
        by = preferred(first(own & (frame.metric == "block_update_ratio")), ratio.dropna())
    elif name == "attn_entropy_min":
        by = frame[owned & (frame.metric == "attn_entropy")].groupby("step").value.min()
    elif name == "attn_logit_max":
        by = frame[owned & (frame.metric == "attn_logit_max")].groupby("step").value.max()
    else:
        raise AssertionError(tag)
    if name not in RUN_METRICS:  # a NaN loss is a row of its own, logged as NaN
        by = by.dropna()
    return by.index.tolist(), by.to_numpy(np.float32)


def assert_wandb_rows_are_the_table(rows: list[dict], frame, logged: set[str]) -> None:
    """Each logged ``stabscope/...`` series of W&B history ``rows`` (NaN written as "NaN")
    holds ``live_expected``'s steps and values."""
    for key in sorted(logged):
        got = [(r["stabscope/step"], r[key]) for r in rows if key in r]
        want_steps, want = live_expected(frame, key.removeprefix("stabscope/"))
        assert [s for s, _ in got] == want_steps, key
        values = np.array([math.nan if v == "NaN" else v for _, v in got], np.float64)
        np.testing.assert_allclose(values, want, rtol=2e-6, err_msg=key)


@pytest.mark.slow
def test_tensorboard_live_series_equal_the_run_table(tmp_path: Path):
    tb = tmp_path / "tb"
    train_gpt(tmp_path / "run", log_to=f"tensorboard:{tb}")
    frame = load_run(tmp_path / "run", phase="train")
    frame = frame[frame.call == 0].astype({"module": str, "metric": str})
    acc = read_back(tb)
    tags = set(acc.Tags()["scalars"])
    blocks = ["blocks.0", "blocks.1", "blocks.2"]
    wanted = {"loss", "lr", "grad_norm"} | {f"{s.name}/{b}" for s in BLOCK_SERIES for b in blocks}
    assert wanted <= tags, wanted - tags
    for tag in sorted(tags):
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        values = np.array([e.value for e in events], np.float32)
        want_steps, want = live_expected(frame, tag)
        assert steps == want_steps, tag
        np.testing.assert_allclose(values, want, rtol=2e-6, err_msg=tag)
    # the every-step tier: act_rms of a block at every step but the first (a recorded one)
    assert [e.step for e in acc.Scalars("act_rms/blocks.1")] == list(range(STEPS))


@pytest.mark.slow
def test_findings_arrive_as_text_with_their_remedy(tmp_path: Path):
    tb = tmp_path / "tb"
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StabscopeWarning)
        train_gpt(tmp_path / "run", log_to=f"tensorboard:{tb}", on_finding=seen.append, nan_at=6)
    assert "nonfinite" in {f.rule for f in seen}
    texts = read_back(tb).Tensors("stabscope/findings")
    assert len(texts) == len(seen)
    first = texts[0].tensor_proto.string_val[0].decode()
    assert f"`{seen[0].rule}`" in first and seen[0].message in first
    if seen[0].remedy:
        assert f"*remedy:* {seen[0].remedy}" in first


@pytest.mark.slow
def test_a_32_layer_model_stays_under_the_cap(tmp_path: Path):
    model, forward = sample_gpt("pre", depth=32)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    tb = tmp_path / "tb"
    for cap, out in ((256, tb / "all"), (40, tb / "few")):
        cfg = stabscope.RecorderConfig(
            schedule=stabscope.Schedule(2, 0), flight_every=2, live_max_series=cap
        )
        run = record_steps(
            model, tmp_path / f"run{cap}", forward, opt, 3, cfg, log_to=f"tensorboard:{out}"
        )
        tags = read_back(out).Tags()["scalars"]
        assert len(tags) <= cap
        kept = sorted({int(t.rsplit(".", 1)[1]) for t in tags if t.startswith("act_rms/")})
        assert kept[0] == 0 and kept[-1] == 31
        if cap == 256:
            assert len(kept) == 32 and len(tags) > 6 * 32
        else:
            assert 2 <= len(kept) < 32 and np.ptp(np.diff(kept)) <= 1  # evenly spaced
            assert any("live series" in n for n in load_meta(run)["notes"])


def test_bad_targets_are_usage_errors_before_the_run_is_made(tmp_path: Path):
    model, _ = sample_gpt("post", depth=1)
    for target, words in (("tensorbord:x", "unknown --log-to target"), ("tensorboard", "unknown")):
        with pytest.raises(UsageError, match=words) as err:
            stabscope.Recorder(model, tmp_path / "run", log_to=target)
        assert "tensorboard:DIR" in err.value.hint
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_unwritable_log_dir_warns_once_and_records_everything(tmp_path: Path):
    """A log directory that cannot be made (a file is in its way): one warning, the run's rows
    all on disk, the same as without the bridge."""
    (tmp_path / "file").write_text("")
    with pytest.warns(StabscopeWarning, match="could not start") as caught:
        train_gpt(tmp_path / "run", 4, log_to=f"tensorboard:{tmp_path / 'file' / 'tb'}")
    assert sum("live logging" in str(w.message) for w in caught) == 1
    train_gpt(tmp_path / "plain", 4)
    assert count_rows(tmp_path / "run") == count_rows(tmp_path / "plain")
    meta = load_meta(tmp_path / "run")
    assert meta["status"] == "complete"
    assert any("could not start" in n for n in meta["notes"])
