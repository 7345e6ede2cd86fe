"""Running the test scripts with and without stabscope, in this process, and reading back."""

from __future__ import annotations

import json
import runpy
import textwrap
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import stabscope
from stabscope.drivers.zerocode import profile_training_script
from stabscope.drivers.zerocode.runner import as_main
from stabscope.record.config import RecorderConfig

SCRIPTS = Path(__file__).resolve().parent


def classify_loop(inputs: int) -> str:
    """The training loop of an inline test script (its ``model``, ``opt`` and generator ``g``
    defined before it): 12 steps of a cross-entropy on the argmax of the first 4 of
    ``inputs`` features, the script's losses in ``log``."""
    return f"""
log = []
for step in range(12):
    x = torch.randn(32, {inputs}, generator=g)
    loss = F.cross_entropy(model(x), x[:, :4].argmax(1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    log.append(loss.item())
"""


def recorded_ce_step(net: Any, opt: Any, rec: Any, x: Any, y: Any) -> float:
    """One recorded training step of a classifier: cross-entropy of ``net(x)`` against the
    labels ``y``, backward, ``opt.step()``, ``rec.step(loss)``; the loss before the update."""
    loss = torch.nn.functional.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    rec.step(loss)
    return float(loss.item())


def read_log(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def record(
    tmp_path: Path, script: str, *args: str, config: RecorderConfig | None = None, **kw: Any
) -> tuple[Path, list[dict[str, float]]]:
    """Profile ``script`` with ``--log``; returns the run directory and the script's log."""
    out, log = tmp_path / "run", tmp_path / "recorded.jsonl"
    profile_training_script(
        SCRIPTS / script, [*args, "--log", str(log)], out, config or RecorderConfig(), **kw
    )
    return out, read_log(log)


def plain(tmp_path: Path, script: str, *args: str) -> list[dict[str, float]]:
    """The script's log when it runs without stabscope (same seed as ``record``)."""
    log = tmp_path / "plain.jsonl"
    torch.manual_seed(0)
    with as_main(SCRIPTS / script, [*args, "--log", str(log)]):
        runpy.run_path(str(SCRIPTS / script), run_name="__main__")
    return read_log(log)


def values(run: Path, module: str, metric: str, phase: str = "train") -> pd.DataFrame:
    """step, call, value of one module's metric, sorted by step and call."""
    df = stabscope.load_run(run, modules=[module], metrics=[metric])
    df = df[df.phase == phase]
    return df[["step", "call", "value"]].sort_values(["step", "call"]).reset_index(drop=True)


def rms(t: torch.Tensor) -> float:
    return t.detach().double().pow(2).mean().sqrt().item()


def run_both(
    tmp_path: Path, text: str, config: RecorderConfig | None = None, budget: int | None = None
) -> tuple[Path, Path, Path]:
    """Write ``text`` as a script that takes its log's path as its one argument, run it
    without stabscope and then profiled (the same torch seed before each): (the plain log,
    the profiled log, the run directory)."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(text))
    plain_log, profiled_log, run = (
        tmp_path / "plain.log",
        tmp_path / "profiled.log",
        tmp_path / "run",
    )
    torch.manual_seed(0)
    with as_main(script, [str(plain_log)]):
        runpy.run_path(str(script), run_name="__main__")
    torch.manual_seed(0)
    profile_training_script(
        script, [str(profiled_log)], run, config or RecorderConfig(), budget=budget
    )
    return plain_log, profiled_log, run
