"""`stabscope export RUN --to tensorboard`: the event files read back with TensorBoard's own
reader hold the run table's numbers (tags, steps, values), the findings with their remedies
and the heatmaps; the series stay under the cap; it runs without torch, and without the
tensorboard extra it is one line with the install hint."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import stabscope
from stabscope import Schedule
from stabscope.cli import app
from stabscope.report.data import HEATMAPS
from stabscope.rules.gate import judge
from tests.conftest import record_steps, sample_gpt
from tests.recorded_runs import gpt_run  # noqa: F401  (fixture)
from tests.report_runs import FINDINGS, write_run
from tests.test_import_guards import run_blocked

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)

runner = CliRunner()


def read_back(out: Path) -> EventAccumulator:
    acc = EventAccumulator(str(out), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def export(run: Path, out: Path, *options: str):
    res = runner.invoke(app, ["export", str(run), "--to", "tensorboard", "-o", str(out), *options])
    assert res.exit_code == 0, res.output
    return res


def scalars(acc: EventAccumulator, tag: str) -> tuple[list[int], np.ndarray]:
    events = acc.Scalars(tag)
    return [e.step for e in events], np.array([e.value for e in events], np.float32)


def expected(frame, tag: str) -> tuple[list[int], np.ndarray]:
    """The value per step that ``tag`` stands for, recomputed from the run table here."""
    name, _, block = tag.partition("/")
    owned = frame.module.str.startswith(f"{block}.")
    own = frame.module == block

    def first(metric: str):
        return frame[own & (frame.metric == metric)].groupby("step").value.first()

    pick = {
        "loss": (frame.metric == "loss", "first"),
        "lr": ((frame.metric == "lr") & (frame["index"] == 0), "first"),
        "attn_entropy_min": (owned & (frame.metric == "attn_entropy"), "min"),
        "attn_logit_max": (owned & (frame.metric == "attn_logit_max"), "max"),
    }
    if name in ("act_rms", "grad_rms"):
        # The flight recorder's every-step value where a step has it, else the scheduled one
        # (step 0, recorded before the blocks were known).
        by = first(f"flight_{name}").combine_first(first(name))
    elif name in pick:
        mask, how = pick[name]
        by = frame[mask].groupby("step").value.agg(how)
    elif name in ("param_grad_norm", "update_ratio"):

        def rss(metric):
            rows = frame[owned & (frame.metric == metric)]
            return np.sqrt((rows.value.astype(np.float64) ** 2).groupby(rows.step).sum())

        if name == "param_grad_norm":
            by = rss(name)
        elif (own & (frame.metric == "block_update_ratio")).any():  # every step, when recorded
            by = frame[own & (frame.metric == "block_update_ratio")].groupby("step").value.first()
        else:
            by = rss("update_norm") / rss("param_norm")
    elif tag == "worst/attn_logit_max":
        by = frame[frame.metric == "attn_logit_max"].groupby("step").value.max()
    else:
        raise AssertionError(tag)
    return by.index.tolist(), by.to_numpy(np.float32)


@pytest.mark.slow
def test_event_files_hold_the_run_tables_numbers(gpt_run: Path, tmp_path: Path):  # noqa: F811
    export(gpt_run, tmp_path / "tb")
    acc = read_back(tmp_path / "tb")
    tags = set(acc.Tags()["scalars"])
    blocks = [f"blocks.{i}" for i in range(4)]
    per_block = ["act_rms", "grad_rms", "param_grad_norm", "update_ratio"]
    per_block += ["attn_entropy_min", "attn_logit_max"]
    assert {f"{m}/{b}" for m in per_block for b in blocks} | {"loss", "lr"} <= tags
    frame = stabscope.load_run(gpt_run, phase="train", merge_ranks=True)
    frame = frame[frame.call == 0].assign(module=lambda f: f.module.astype(str))
    frame["metric"] = frame.metric.astype(str)
    checked = [f"{m}/{b}" for m in per_block for b in blocks]
    for tag in ["loss", "lr", *checked, "worst/attn_logit_max"]:
        steps, values = scalars(acc, tag)
        want_steps, want = expected(frame, tag)
        assert steps == want_steps, tag
        np.testing.assert_allclose(values, want, rtol=1e-6, err_msg=tag)
    assert scalars(acc, "loss")[0] == list(range(6))  # every step, recorded or not


@pytest.mark.slow
def test_findings_are_text_with_remedies_and_heatmaps_images(gpt_run: Path, tmp_path: Path):  # noqa: F811
    from PIL import Image

    export(gpt_run, tmp_path / "tb")
    acc = read_back(tmp_path / "tb")
    (text,) = acc.Tensors("stabscope/findings")
    markdown = text.tensor_proto.string_val[0].decode()
    found = judge(gpt_run).findings
    assert f"**{len(found)} findings**" in markdown and found
    for f in found:
        assert f"`{f.rule}`" in markdown and f.remedy in markdown
    images = {t.removeprefix("heatmaps/") for t in acc.Tags()["images"]}
    assert {"act_rms", "grad_rms", "attn_entropy", "update_ratio"} <= images <= set(HEATMAPS)
    (image,) = acc.Images("heatmaps/grad_rms")
    png = Image.open(io.BytesIO(image.encoded_image_string))
    assert png.size == (image.width, image.height) and min(png.size) >= 4


@pytest.mark.slow
def test_a_32_layer_run_stays_under_the_cap_and_thins_blocks_evenly(tmp_path: Path):
    run = write_run(tmp_path / "deep", layers=32, steps=range(3), findings=FINDINGS)
    res = export(run, tmp_path / "all", "--no-images")
    tags = read_back(tmp_path / "all").Tags()["scalars"]
    assert len(tags) <= 256 and "act_rms/blocks.31" in tags
    assert "series (cap 256), 32 blocks" in res.stderr
    export(run, tmp_path / "few", "--max-series", "40", "--no-images")
    acc = read_back(tmp_path / "few")
    tags = acc.Tags()["scalars"]
    assert len(tags) <= 40
    kept = sorted(int(t.rsplit(".", 1)[1]) for t in tags if t.startswith("act_rms/"))
    assert kept[0] == 0 and kept[-1] == 31 and len(kept) >= 4
    assert np.ptp(np.diff(kept)) <= 1  # evenly spaced
    (note,) = acc.Tensors("stabscope/export")
    assert "left out for the cap" in note.tensor_proto.string_val[0].decode()


def test_a_second_export_needs_force(tmp_path: Path):
    run = write_run(tmp_path / "r", layers=2, steps=range(2), findings=FINDINGS)
    export(run, tmp_path / "tb", "--no-images")
    res = runner.invoke(
        app, ["export", str(run), "--to", "tensorboard", "-o", str(tmp_path / "tb")]
    )
    assert res.exit_code == 2 and "--force" in res.stderr
    export(run, tmp_path / "tb", "--no-images", "--force")
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
    res = runner.invoke(app, ["export", str(run), "--to", "neptune"])
    assert res.exit_code == 2 and "'tensorboard'" in res.stderr and "'wandb'" in res.stderr


#: argv: run, out, target. ``export`` in a process where an import may be blocked.
EXPORT_BLOCKED = """
import json, sys
from typer.testing import CliRunner
from stabscope.cli import app
res = CliRunner().invoke(app, ["export", sys.argv[1], "--to", sys.argv[3], "-o", sys.argv[2]])
print(json.dumps({"code": res.exit_code, "stderr": res.stderr, "torch": "torch" in sys.modules}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("blocked", ["torch", "tensorboard"])
def test_without_torch_it_exports_and_without_tensorboard_it_says_how(tmp_path: Path, blocked):
    run = write_run(tmp_path / "r", layers=2, steps=range(2), findings=FINDINGS)
    out = json.loads(
        run_blocked(blocked, EXPORT_BLOCKED, str(run), str(tmp_path / "tb"), "tensorboard")
    )
    assert out["torch"] is False
    if blocked == "torch":
        assert out["code"] == 0, out["stderr"]
        assert "loss" in read_back(tmp_path / "tb").Tags()["scalars"]
    else:
        lines = out["stderr"].strip().splitlines()
        assert out["code"] == 2 and len(lines) == 2
        assert lines[0] == "error: tensorboard is not installed"
        assert "pip install 'stabscope[tensorboard]'" in lines[1]
        assert not (tmp_path / "tb").exists() or not any((tmp_path / "tb").iterdir())


def test_the_run_directory_is_left_as_it_was(gpt_run: Path, tmp_path: Path):  # noqa: F811
    from tests.cli_inputs import snapshot

    run = shutil.copytree(gpt_run, tmp_path / "run")
    before = snapshot(run)
    export(run, tmp_path / "tb", "--no-images")
    assert snapshot(run) == before
    res = runner.invoke(app, ["export", str(run), "--to", "tensorboard", "-o", str(run / "tb")])
    assert res.exit_code == 2 and "inside the run directory" in res.stderr


@pytest.mark.slow
def test_a_run_without_a_probe_forward_exports_step_0_from_the_recorded_step(tmp_path: Path):
    """Without a probe forward the blocks are known from step 1: the flight recorder's rows
    start there, and step 0, recorded, gives its scheduled value of the same definition."""
    model, forward = sample_gpt("pre", depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    run = record_steps(
        model, tmp_path / "run", forward, opt, 4, probe_forward=False, schedule=Schedule(1, 0)
    )
    frame = stabscope.load_run(run, modules=["blocks.1"], metrics=["act_rms", "flight_act_rms"])
    assert sorted(frame[frame.metric == "flight_act_rms"].step) == [1, 2, 3]
    export(run, tmp_path / "tb")
    steps, values = scalars(read_back(tmp_path / "tb"), "act_rms/blocks.1")
    assert steps == [0, 1, 2, 3]
    want = frame.sort_values("step").value.to_numpy(np.float32)  # one row a step: 0 recorded
    np.testing.assert_allclose(values, want, rtol=1e-6)
