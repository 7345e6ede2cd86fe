"""``--force`` (``force=True``) replaces a run, and only a run: the new run keeps nothing of
the old one (no part, no findings.json that would speak for it, no prediction of another
model), and a ``parts/`` folder holding anything stabscope's writer does not make is
refused whole, with nothing removed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import stabscope
from stabscope.cli import app
from stabscope.errors import RunExistsError
from tests.conftest import batch_maker, mlp, train

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
runner = CliRunner()


def snapshot(path: Path) -> dict[str, str]:
    """Every file under ``path`` (dot-files included) and a hash of its bytes."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def profile(out: Path, *extra: str):
    args = ["profile", str(SAMPLES / "mlp.py"), "--steps", "4", "--out", str(out), "-q"]
    return runner.invoke(app, [*args, *extra])


@pytest.mark.slow
def test_force_leaves_no_file_of_the_old_run(tmp_path):
    out = tmp_path / "run"
    assert profile(out).exit_code == 0
    runner.invoke(app, ["check", str(out), "-q"])  # writes findings.json
    # The old run's profile from the theory (sample_models/gpt.py runs get one at profile).
    (out / "prediction.json").write_text('{"model": "the old run\'s"}')
    assert (out / "findings.json").is_file() and (out / "prediction.json").is_file()
    old_parts = {p.name for p in (out / "parts").iterdir()}
    # The new run is an API run of another model: it writes no prediction of its own.
    torch.manual_seed(0)
    with stabscope.Recorder(mlp(), out, force=True) as rec:
        losses = train(rec.model, 3, batch_maker(6, 3), rec)
    assert not (out / "findings.json").exists()  # it spoke of the old run
    assert not (out / "prediction.json").exists()  # the old model's profile
    recorded = stabscope.load_run(out, metrics="loss").sort_values("step").value.tolist()
    assert recorded == pytest.approx(losses, rel=1e-6)  # the new run's losses, only them
    assert stabscope.read_meta(out)["steps"] == 3
    assert old_parts >= {p.name for p in (out / "parts").iterdir()}  # renumbered from 0


def test_a_parts_folder_of_someone_elses_files_is_refused_whole(tmp_path):
    out = tmp_path / "cad"
    (out / "parts").mkdir(parents=True)
    (out / "parts" / "bracket.step").write_text("ISO-10303-21;")
    (out / "meta.json").write_text('{"project": "bracket"}')
    before = snapshot(out)
    res = profile(out, "--force")
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert lines[0] == f"error: {out / 'parts'} holds files stabscope did not write (bracket.step)"
    assert "force replaces only a run" in lines[1]
    assert snapshot(out) == before  # nothing removed, not even meta.json
    with pytest.raises(RunExistsError, match="did not write"):
        stabscope.Recorder(mlp(), out, force=True)
    assert snapshot(out) == before


@pytest.mark.slow
def test_force_clears_the_temporary_part_a_killed_writer_left(tmp_path):
    out = tmp_path / "run"
    assert profile(out).exit_code == 0
    (out / "parts" / ".part-000007.parquet.tmp").write_bytes(b"PAR1 half written")
    assert profile(out, "--force").exit_code == 0
    assert not (out / "parts" / ".part-000007.parquet.tmp").exists()
    assert stabscope.read_meta(out)["status"] == "complete"
