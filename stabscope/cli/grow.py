"""``stabscope grow``: function-preserving expansions (Gesmundo & Maile 2023), checked on probe
batches, then profiled with the usual recorder; ``--sweep`` makes one grown run per factor."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..errors import UsageError
from . import values
from .common import Quiet, app, fail
from .grow_output import print_result, run_bars

if TYPE_CHECKING:
    from ..drivers.grow import GrowResult
    from ..grow.sizes import GrowthSpec


@app.command()
def grow(
    script: Annotated[Path, typer.Argument(help="Model script (see README: Model scripts).")],
    depth: Annotated[
        str | None, typer.Option(help="Layers: a factor (4x) or a count (layer addition).")
    ] = None,
    width: Annotated[
        str | None,
        typer.Option(help="Hidden size, MLP and heads together, head size kept (2x)."),
    ] = None,
    hidden: Annotated[
        str | None, typer.Option(help="Residual stream width h (needs RMSNorm).")
    ] = None,
    mlp: Annotated[str | None, typer.Option(help="MLP inner width p.")] = None,
    heads: Annotated[str | None, typer.Option(help="Attention heads E (head addition).")] = None,
    head_dim: Annotated[
        str | None, typer.Option(help="Per-head query/key and value size together.")
    ] = None,
    key_dim: Annotated[
        str | None, typer.Option(help="Per-head query/key size k (attention expansion).")
    ] = None,
    value_dim: Annotated[
        str | None, typer.Option(help="Per-head value size v (heads expansion).")
    ] = None,
    position: Annotated[
        str, typer.Option(help="Where new layers go: interleave, start, end, or a layer index.")
    ] = "interleave",
    init: Annotated[
        str, typer.Option(help="Free parameters: random (scale of the existing) or copy.")
    ] = "random",
    sweep: Annotated[
        str | None,
        typer.Option(help="Comma-separated factors, one grown run each: --sweep 2,4,8."),
    ] = None,
    sweep_axis: Annotated[
        str, typer.Option(help="What --sweep grows: depth, width, hidden, mlp, heads, ...")
    ] = "depth",
    steps: Annotated[
        int, typer.Option(help="Training steps to profile; 1 = the statistics at init.")
    ] = 1,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help=r"Output directory \[default: runs/SCRIPT-grow, or runs/SCRIPT-AXIS-sweep].",
        ),
    ] = None,
    probes: Annotated[int, typer.Option(help="Probe batches for the preservation check.")] = 2,
    tolerance: Annotated[
        float | None,
        typer.Option(
            help=r"Largest |Δ output| accepted \[default: 1e-5 x max(1, max |output|); "
            "16 eps of the scale for bfloat16/float16 outputs]."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for the model, batches and new weights.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    preset: Annotated[str, typer.Option(help="Recorder preset: cheap, standard, full.")] = (
        "standard"
    ),
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a CONFIG value (repeatable).")
    ] = None,
    no_base: Annotated[
        bool, typer.Option("--no-base", help="Do not profile the base model.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite runs in --out.")] = False,
    quiet: Quiet = False,
) -> None:
    """Grow a model without changing what it computes, check that, and profile it.

    Writes run directories OUT/base and OUT/grown (or OUT/AXIS-Fx per --sweep factor).
    Exit 1 when a grown model changed the outputs beyond --tolerance; 2 on bad input.
    """
    from ..grow.sizes import GrowthSpec

    base_spec = GrowthSpec(
        depth, width, hidden, mlp, heads, head_dim, key_dim, value_dim, position, init, seed
    )
    run_root = out or _default_out(script, sweep_axis if sweep is not None else None)
    try:
        variants = _variants(base_spec, sweep, sweep_axis)
        result = _grow(
            script,
            variants,
            run_root,
            steps,
            seed,
            device,
            preset,
            set_ or [],
            probes,
            tolerance,
            no_base,
            force,
            quiet,
        )
    except UsageError as e:
        raise fail(e) from None
    code = print_result(result, run_root, sweep_axis if sweep else None, variants, quiet)
    raise typer.Exit(code)


def _default_out(script: Path, axis: str | None) -> Path:
    """``runs/SCRIPT-grow``, or ``runs/SCRIPT-AXIS-sweep`` for a sweep, so that a single grow
    and a sweep of the same script do not claim the same run directories."""
    return Path("runs") / (f"{script.stem}-grow" if axis is None else f"{script.stem}-{axis}-sweep")


def _variants(
    spec: GrowthSpec, sweep: str | None, axis: str
) -> list[tuple[str, GrowthSpec, float]]:
    """``(run name, spec, size)`` per grown model; size is the sweep factor."""
    from ..grow.sizes import SIZE_AXES

    if sweep is None:
        if not spec.requested():
            raise UsageError(
                "nothing to grow", hint="pass a size, e.g. --depth 2x, --width 2x or --mlp 2x"
            )
        return [("grown", spec, 0.0)]
    if axis not in SIZE_AXES:
        raise UsageError(f"unknown --sweep-axis {axis!r}", hint=f"one of {', '.join(SIZE_AXES)}")
    if axis in spec.requested():
        raise UsageError(
            f"--{axis.replace('_', '-')} and --sweep both set the {axis}",
            hint=f"drop --{axis.replace('_', '-')}; the sweep sets it per run",
        )
    try:
        factors = [float(f.strip().rstrip("x")) for f in sweep.split(",") if f.strip()]
    except ValueError:
        raise UsageError(f"bad --sweep {sweep!r}", hint="factors like 2,4,8") from None
    if not factors:
        raise UsageError("--sweep has no factors", hint="e.g. --sweep 2,4,8")
    if len(set(factors)) < len(factors) or 1.0 in factors:
        raise UsageError(
            f"--sweep {sweep} repeats a factor or asks for 1x",
            hint="give distinct factors above 1 (the base run is the 1x point)",
        )
    return [(f"{axis}-{f:g}x", spec.with_size(axis, f), f) for f in factors]


def _grow(
    script: Path,
    variants: list[tuple[str, GrowthSpec, float]],
    run_root: Path,
    steps: int,
    seed: int,
    device: str,
    preset: str,
    sets: list[str],
    probes: int,
    tolerance: float | None,
    no_base: bool,
    force: bool,
    quiet: bool,
) -> GrowResult:
    from ..drivers.grow import BASE, GrowSettings, grow_script
    from ..drivers.script import load_script, parse_set
    from ..record.config import load_pyproject_config

    try:
        config = load_pyproject_config().replace(preset=preset)
    except UsageError:  # [tool.stabscope] of the wrong type: names the key
        raise
    except ValueError as e:
        raise UsageError(str(e), hint="see `stabscope grow --help`") from None
    if steps < 1:
        raise UsageError(f"--steps must be positive, got {steps}", hint="1 profiles at init")
    if tolerance is not None and not 0 <= tolerance < math.inf:
        raise UsageError(
            f"--tolerance must be zero or positive (and finite), got {tolerance}",
            hint="leave it out for the default, 1e-5 x the output's scale",
        )
    values.seed(seed)
    loaded = load_script(script, parse_set(sets))
    settings = GrowSettings(steps, config, seed, device, probes, tolerance, force, not no_base)
    names = ([] if no_base else [BASE]) + [name for name, _, _ in variants]
    # grow_script claims the run directories before any work; the bars appear only once
    # profiling starts, so its errors stay one line.
    with run_bars(names, steps, quiet) as progress:
        return grow_script(
            loaded, [(name, spec) for name, spec, _ in variants], run_root, settings, progress
        )
