"""``stabscope grow``: function-preserving expansions (Gesmundo & Maile 2023), checked on probe
batches, then profiled with the usual recorder; ``--sweep`` makes one grown run per factor."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from ..errors import UsageError
from . import values
from .common import app, err, fail

if TYPE_CHECKING:
    import pandas as pd

    from ..drivers.grow import GrowResult
    from ..drivers.profile import ProgressFn
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
            help=r"Output directory \[default: runs/SCRIPT-grow, or runs/SCRIPT-AXIS-sweep]."
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
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
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
    code = _print_result(result, run_root, sweep_axis if sweep else None, variants)
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
    with _run_bars(names, steps, quiet) as progress:
        return grow_script(
            loaded, [(name, spec) for name, spec, _ in variants], run_root, settings, progress
        )


@contextmanager
def _run_bars(names: list[str], steps: int, quiet: bool) -> Iterator[Callable[[str], ProgressFn]]:
    """One bar per run (base and each grown model): a sweep shows how far it has come. The
    bars appear when profiling starts, after every grown model passed its check."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

    columns = (
        TextColumn("[bold]{task.description:>12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
    )
    with Progress(*columns, console=err, disable=quiet) as bars:
        tasks: dict[str, TaskID] = {}

        def for_run(name: str) -> ProgressFn:
            if not tasks:
                # The description column is markup: the names go in as text.
                tasks.update({n: bars.add_task(escape(n), total=steps, loss="-") for n in names})

            def update(done: int, total: int, loss: float | None) -> None:
                text = "-" if loss is None else f"{loss:.4g}"
                bars.update(tasks[name], completed=done, loss=text)

            return update

        yield for_run


def _print_result(
    result: GrowResult,
    run_root: Path,
    axis: str | None,
    variants: list[tuple[str, GrowthSpec, float]],
) -> int:
    for v in result.variants:
        if v.growth is None or v.preservation is None:
            continue
        p = v.preservation
        verdict = "[green]preserved[/]" if p.passed else "[bold red]CHANGED[/]"
        err.print(
            f"{escape(v.name)}: {escape(v.growth.summary)} ({v.growth.family}); max |Δ output| "
            f"{p.max_abs_diff:.3g} on {p.batches} probe batches (tolerance {p.tolerance:.3g}, "
            f"outputs up to {p.max_abs_output:.3g}): {verdict}",
            soft_wrap=True,
        )
        if p.nonfinite:
            err.print(
                f"[yellow]note:[/] {p.nonfinite} base outputs are NaN or Inf; they count as kept "
                "where the grown model has the same value",
                soft_wrap=True,
            )
    if not result.passed:
        names = ", ".join(v.name for v in result.failed)
        err.print(
            f"[bold red]error:[/] the grown model changed what it computes ({escape(names)}); "
            "nothing was profiled",
            soft_wrap=True,
        )
        err.print("[dim]hint:[/] see docs/grow.md for which expansions each norm placement keeps")
        return 1
    sizes = {name: size for name, _, size in variants}
    table = _scaling(result, run_root, sizes)
    _print_table(table, axis)
    grown = [v.run_dir for v in result.variants if v.growth is not None]
    base = [v.run_dir for v in result.variants if v.growth is None]
    runs = " ".join(str(p) for p in base + grown)
    err.print(
        escape(f"next: stabscope report {runs} -o grow.html; stabscope check {grown[-1]}"),
        soft_wrap=True,
    )
    return 0


def _scaling(result: GrowResult, run_root: Path, sizes: dict[str, float]) -> pd.DataFrame:
    """The scaling table over base and grown runs, written to OUT/scaling.csv. The size is
    the sweep factor, or for a single grow the parameter count relative to the base."""
    from ..grow.table import scaling_table, write_table

    rows = [(v.name, v.run_dir, sizes.get(v.name) or v.size) for v in result.variants]
    table = scaling_table(rows)
    path = write_table(table, run_root)
    err.print(f"scaling table: [bold]{escape(str(path))}[/]", soft_wrap=True)
    return table


def _print_table(table: pd.DataFrame, axis: str | None) -> None:
    from rich.table import Table

    from ..grow.table import exponents

    def num(x: object) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"

    title = f"how the statistics scale with {axis}" if axis else "base and grown model"
    out = Table(title=title, title_justify="left")
    for col in ("run", "size", "N", "h", "p", "E", "params", "loss", "growth", "max (step)"):
        out.add_column(col, justify="left" if col == "run" else "right")
    records = table.to_dict("records")
    for r in records:
        out.add_row(
            escape(str(r["run"])),
            f"{r['size']:.3g}",
            *(num(r[k]) for k in ("depth", "hidden", "mlp", "heads")),
            _count(r["params"]),
            f"{num(r['loss_first'])}→{num(r['loss_last'])}",
            num(r["grad_growth_init"]),
            f"{num(r['grad_growth_max'])} ({num(r['grad_growth_step'])})",
        )
    err.print(out)
    err.print(
        "N layers, h hidden, p MLP, E heads; growth: the last layer's parameter-gradient norm "
        "over the first layer's at the first recorded step, and its largest value",
        soft_wrap=True,
    )
    for r in records:
        if r["findings"]:
            err.print(escape(f"findings of {r['run']}: {r['findings']}"), soft_wrap=True)
    if axis and len(table) > 2:
        fits = exponents(table)
        err.print(
            f"fitted exponents a in stat ∝ {axis}^a: "
            + ", ".join(f"{k} {num(v)}" for k, v in fits.items()),
            soft_wrap=True,
        )


def _count(n: object) -> str:
    if not isinstance(n, (int, float)) or n != n:
        return "-"
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k"
