"""``stabscope grow`` as a library call: build the script's model, grow it, check that the
grown model computes the same outputs, then profile base and grown models with the usual
recorder (``profile_script``) into run directories that ``report`` and ``check`` read.

No printing, no exiting: the CLI renders the result and decides the exit code.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ..grow.expansion import Growth, grow_model
from ..grow.sizes import GrowthSpec
from ..grow.verify import Preservation, compare
from ..record.config import RecorderConfig
from ..store import update_meta_file
from ..store.layout import META_FILE, PARTS_DIR
from ..store.rundir import lock_run_dir, prepare_run_dir, release_run_dir, run_dir_error
from ..structure import Structure, discover
from .amplification import _output
from .profile import (
    ProfileResult,
    ProgressFn,
    _call,
    _next_batch,
    build_for_inspection,
    pick_device,
    profile_script,
    seed_everything,
)
from .script import ModelScript

BASE = "base"


@dataclass
class Variant:
    """One model of a grow run: the base, or a grown model (with how it was grown)."""

    name: str
    run_dir: Path
    growth: Growth | None = None
    preservation: Preservation | None = None
    profile: ProfileResult | None = None

    @property
    def size(self) -> float:
        """Parameters relative to the base (1 for the base)."""
        return 1.0 if self.growth is None else self.growth.params / self.growth.base_params


@dataclass
class GrowResult:
    variants: list[Variant]
    failed: list[Variant] = field(default_factory=list)  # grown models that changed the outputs

    @property
    def passed(self) -> bool:
        return not self.failed


@dataclass
class GrowSettings:
    """How to check and profile (the CLI's options other than the sizes)."""

    steps: int = 1
    config: RecorderConfig = field(default_factory=RecorderConfig)
    seed: int = 0
    device: str = "auto"
    probes: int = 2
    tolerance: float | None = None
    force: bool = False
    profile_base: bool = True


def grow_script(
    script: ModelScript,
    variants: list[tuple[str, GrowthSpec]],
    out: Path,
    settings: GrowSettings,
    progress: Callable[[str], ProgressFn | None] | None = None,
) -> GrowResult:
    """Grow the script's model once per ``(name, spec)``, check every grown model on probe
    batches, and (when all keep the outputs) profile the base and each grown model into
    ``out/NAME``. Nothing is profiled when a grown model changed the outputs."""
    if settings.probes < 1:
        raise UsageError(f"--probes must be positive, got {settings.probes}", hint="e.g. 2")
    dev = pick_device(settings.device)
    names = ([BASE] if settings.profile_base else []) + [name for name, _ in variants]
    claim_run_dirs(out, names, settings.force)
    try:
        return _grow_and_profile(script, variants, out, settings, progress, dev)
    finally:
        for name in names:  # claims of runs that were not profiled (a check failed)
            release_run_dir(out / name)


def _grow_and_profile(
    script: ModelScript,
    variants: list[tuple[str, GrowthSpec]],
    out: Path,
    settings: GrowSettings,
    progress: Callable[[str], ProgressFn | None] | None,
    dev: torch.device,
) -> GrowResult:
    base, _ = build_for_inspection(script, settings.seed)
    probes = _probe_batches(script, settings.seed, settings.probes, dev)
    base = base.to(dev)
    result = GrowResult([Variant(BASE, out / BASE)] if settings.profile_base else [])
    for name, spec in variants:
        growth = grow_model(base, spec)
        if not growth.steps:
            raise UsageError(
                "nothing to grow: the requested sizes are the model's own ("
                + ", ".join(f"{k} {v}" for k, v in growth.base.to_dict().items())
                + ")",
                hint="ask for a larger size, e.g. --depth 2x",
            )
        check = compare(
            base, growth.model, probes, lambda m, b: _output(m, script, b), settings.tolerance
        )
        variant = Variant(name, out / name, growth, check)
        result.variants.append(variant)
        if not check.passed:
            result.failed.append(variant)
    if result.failed:
        return result
    grown = [v.growth for v in result.variants if v.growth is not None]
    base_record = {
        "role": BASE,
        "shape": grown[0].base.to_dict() if grown else None,
        "params": sum(p.numel() for p in base.parameters()),
    }
    for variant in result.variants:
        model = base if variant.growth is None else variant.growth.model
        structure = _wiring(model, script, probes[0])
        variant.profile = _profile(
            script, model, variant.run_dir, settings, progress, variant.name, structure
        )
        _annotate(variant, base_record)
    return result


def claim_run_dirs(out: Path, names: list[str], force: bool) -> None:
    """Refuse a name used twice, an existing run (without ``force``) and a directory that
    cannot be written, before any work. A run that ``force`` will overwrite stays in place
    until its replacement is profiled: a grown model that fails the check costs no old run."""
    if len(set(names)) < len(names):
        raise UsageError(f"run names repeat: {', '.join(names)}", hint="one run per factor")
    for path in (out / name for name in names):
        try:
            if force and ((path / META_FILE).exists() or (path / PARTS_DIR).exists()):
                lock_run_dir(path)  # locked, left in place until its replacement is profiled
            else:
                prepare_run_dir(path, force=False)
        except OSError as e:
            for name in names:
                release_run_dir(out / name)
            raise run_dir_error(e, path) from None


def _probe_batches(script: ModelScript, seed: int, n: int, dev: torch.device) -> list[Any]:
    """The first ``n`` batches of a fresh, seeded ``batches(cfg)``."""
    seed_everything(seed)
    data = iter(_call(script, "creating batches", script.batches, script.config))
    batches = [_next_batch(script, data, i, dev) for i in range(n)]
    return [b for b in batches if b is not None]


def _wiring(model: nn.Module, script: ModelScript, batch: Any) -> Structure:
    """Blocks, branches and norm placement of ``model``, found on a copy whose all-zero
    tensors are nudged: an added layer's branches output exactly zero, and a branch that adds
    zero cannot be told apart from no branch (structure discovery matches x + f(x) to f)."""
    probe = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in probe.parameters():
            if not p.any():
                p.add_(1e-3 * torch.randn(p.shape, generator=g).to(p))
    return discover(probe, lambda m: script.loss(m, batch))


def _profile(
    script: ModelScript,
    model: nn.Module,
    run_dir: Path,
    settings: GrowSettings,
    progress: Callable[[str], ProgressFn | None] | None,
    name: str,
    structure: Structure,
) -> ProfileResult:
    # The script's own batches, loss, optimizer and scheduler, with the already built model:
    # profiling trains it, so it gets a copy.
    built = dataclasses.replace(script, model=lambda cfg: copy.deepcopy(model))
    return profile_script(
        built,
        run_dir,
        settings.steps,
        settings.config,
        settings.seed,
        settings.device,
        force=True,
        progress=progress(name) if progress is not None else None,
        structure=structure,
    )


def _annotate(variant: Variant, base_record: dict[str, Any]) -> None:
    """Record in meta.json's config block what produced the model and how well it kept the
    base's outputs; the script config gets a one-line summary the report header shows."""
    record = dict(base_record)
    line = "base model"
    if variant.growth is not None and variant.preservation is not None:
        record = {"role": "grown", **variant.growth.record()}
        record["preservation"] = variant.preservation.to_dict()
        line = f"{variant.growth.summary}; max |Δ output| {variant.preservation.max_abs_diff:.2g}"
    update_meta_file(
        variant.run_dir, config={"grow": record}, run={"script_config": {"grow": line}}
    )
