"""Output-change amplification (Admin, Liu et al. 2020): how much a tiny perturbation of every
weight matrix moves the output, as the model gets deeper.

For each depth N the model script builds a fresh model; every parameter with two or more
dimensions is perturbed by δ·(random sign) (δ = 1e-4, as Transformer-Clinic does), and
``E[(F(x, W) − F(x, W + δ))²]`` (mean over output elements, averaged over seeds) is measured on
the script's first batch. Theory: it grows like O(N) for Post-LN and like O(log N) for Pre-LN;
Admin reports about 13x between them at about 200 sub-layers. The result is fitted against N
and against log N, and the better fit (R²) is named. Results are stored as a run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UsageError
from ..probes.logits import output_logits
from ..store import RUN_MODULE, PartWriter, new_meta, save_meta
from ..store.rundir import prepare_run_dir, release_run_dir, run_dir_error
from .profile import _call, pick_device, seed_everything, to_device
from .script import ModelScript, ScriptConfig


@dataclass
class Fit:
    slope: float
    intercept: float
    r2: float


@dataclass
class AmplificationResult:
    depths: list[int]
    change: list[float]  # mean squared output change per depth
    spread: list[float]  # std over seeds
    fit_n: Fit
    fit_log_n: Fit
    run_dir: Path
    notes: list[str] = field(default_factory=list)

    @property
    def better(self) -> str:
        return "N" if self.fit_n.r2 >= self.fit_log_n.r2 else "log N"


def linear_fit(x: np.ndarray, y: np.ndarray) -> Fit:
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    total = float(np.sum((y - y.mean()) ** 2)) or 1e-300
    return Fit(float(slope), float(intercept), 1.0 - float(np.sum(residual**2)) / total)


def _output(model: torch.nn.Module, script: ModelScript, batch: Any) -> torch.Tensor:
    captured: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: Any, out: Any) -> None:
        z = output_logits(out)
        if z is not None:
            captured.append(z.detach().double())

    handle = model.register_forward_hook(keep)
    try:
        with torch.no_grad():
            _call(script, "computing the loss", script.loss, model, batch)
    finally:
        handle.remove()
    if not captured:
        raise UsageError(
            f"{script.path.name}: the model output has no logits-like tensor",
            hint="the model must return a tensor (or a dict with 'logits')",
        )
    return captured[0]


def output_change(
    model: torch.nn.Module, script: ModelScript, batch: Any, delta: float, seed: int
) -> float:
    """Mean squared change of the output when each weight matrix moves by δ·sign."""
    model.eval()
    before = _output(model, script, batch)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                sign = torch.randint(0, 2, p.shape, generator=g).to(p.device, p.dtype) * 2 - 1
                p.add_(delta * sign)
    after = _output(model, script, batch)
    return float((after - before).pow(2).mean())


def run_amplification(
    script: ModelScript,
    depths: list[int],
    out: Path,
    seeds: int = 5,
    delta: float = 1e-4,
    device: str = "cpu",
    force: bool = False,
) -> AmplificationResult:
    if "depth" not in script.config:
        raise UsageError(
            f"{script.path.name}: CONFIG has no 'depth' key",
            hint="amplification builds the model at each depth via CONFIG['depth']",
        )
    if len(depths) < 2 or min(depths) < 1:
        raise UsageError(
            f"need at least two positive depths, got {depths}", hint="e.g. --depths 6,12,24,48"
        )
    dev = pick_device(device)
    try:
        run_dir = prepare_run_dir(out, force)
    except OSError as err:  # a refused, locked or unwritable --out: one line for the CLI
        raise run_dir_error(err, out) from None
    try:
        return _measure(script, depths, run_dir, seeds, delta, dev)
    finally:
        release_run_dir(run_dir)


def _measure(
    script: ModelScript,
    depths: list[int],
    run_dir: Path,
    seeds: int,
    delta: float,
    dev: torch.device,
) -> AmplificationResult:
    change, spread = [], []
    for depth in depths:
        cfg = ScriptConfig({**script.config, "depth": depth})
        values = []
        for seed in range(seeds):
            seed_everything(seed)
            model = _call(script, f"building the model at depth {depth}", script.model, cfg)
            model.to(dev)
            batch = to_device(next(iter(script.batches(cfg))), dev)
            values.append(output_change(model, script, batch, delta, seed))
        change.append(float(np.mean(values)))
        spread.append(float(np.std(values)))
    x = np.array(depths, float)
    y = np.array(change)
    result = AmplificationResult(
        list(depths), change, spread, linear_fit(x, y), linear_fit(np.log(x), y), run_dir
    )
    _store(result, script, seeds, delta)
    return result


def _store(result: AmplificationResult, script: ModelScript, seeds: int, delta: float) -> None:
    writer = PartWriter(result.run_dir)
    n = len(result.depths)
    run, phase = writer.modules(RUN_MODULE), writer.phases("train")
    for metric, values in (("amplification", result.change), ("amplification_std", result.spread)):
        writer.append(
            np.zeros(n),
            np.full(n, phase),
            np.full(n, run),
            np.zeros(n),
            np.full(n, writer.metrics(metric)),
            np.array(result.depths),
            values,
        )
    writer.flush()
    fits = {"N": vars(result.fit_n), "log N": vars(result.fit_log_n), "better": result.better}
    save_meta(
        result.run_dir,
        new_meta(
            status="complete",
            kind="amplification",
            steps=0,
            recorded_steps=0,
            rows=writer.rows_written,
            parts=writer.parts_written,
            modules=[],
            parameters=[],
            run={
                "script": str(script.path),
                "script_config": dict(script.config),
                "depths": result.depths,
                "seeds": seeds,
                "delta": delta,
            },
            amplification={
                "depths": result.depths,
                "change": result.change,
                "spread": result.spread,
                "fits": fits,
            },
        ),
    )


__all__ = ["AmplificationResult", "Fit", "linear_fit", "run_amplification"]
