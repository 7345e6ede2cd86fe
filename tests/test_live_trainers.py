"""``log_to="trainer"``: the live series appear in the loggers the user gave the trainer —
Lightning's CSVLogger and TensorBoardLogger, read back from their files — with the run
table's values."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader, TensorDataset

from stabscope import Schedule
from stabscope.store import load_run

L = pytest.importorskip("lightning.pytorch")
pytest.importorskip("tensorboard")
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from stabscope.integrations.lightning import StabscopeCallback  # noqa: E402
from tests.test_integrations_lightning import Regressor, data  # noqa: E402


def table(run: Path, metric: str) -> dict[int, float]:
    df = load_run(run, metrics=[metric], modules=["__run__"], phase="train")
    df = df[df["index"] <= 0]
    return dict(zip(df.step.tolist(), df.value.astype(np.float64).tolist()))


def test_lightning_loggers_get_the_live_series(tmp_path: Path):
    x, y = data()
    logs = tmp_path / "logs"
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        callbacks=[StabscopeCallback(tmp_path / "run", schedule=Schedule(2, 0), log_to="trainer")],
        logger=[CSVLogger(logs, name="csv"), TensorBoardLogger(logs, name="tb")],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(Regressor(), DataLoader(TensorDataset(x, y), batch_size=8))
    loss, lr = table(tmp_path / "run", "loss"), table(tmp_path / "run", "lr")
    assert len(loss) == 18
    (metrics_csv,) = logs.glob("csv/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics_csv.open()))
    got = {int(r["step"]): float(r["stabscope/loss"]) for r in rows if r.get("stabscope/loss")}
    assert got.keys() == loss.keys()
    np.testing.assert_allclose([got[s] for s in loss], list(loss.values()), rtol=1e-6)
    (tb,) = logs.glob("tb/version_*")
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("stabscope/lr")
    assert [e.step for e in events] == sorted(lr)
    np.testing.assert_allclose([e.value for e in events], [lr[s] for s in sorted(lr)], rtol=1e-6)
