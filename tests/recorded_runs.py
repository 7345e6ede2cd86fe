"""One real recorded run for the read-side tests (report verdict, notebook Run, export): the
sample GPT, Post-LN, trained hot enough that the rules find something, its structure found."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import stabscope
from tests.conftest import record_steps, sample_gpt

STEPS = 6


def record_gpt(run: Path, depth: int = 4, lr: float = 3e-2) -> Path:
    model, forward = sample_gpt("post", depth=depth)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    return record_steps(model, run, forward, opt, STEPS, schedule=stabscope.Schedule(4, 0))


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Recorded once per test module; tests that write into it copy it first."""
    return record_gpt(tmp_path_factory.mktemp("gpt") / "run")
