"""``stabscope inspect`` and ``stabscope amplification``: a model script, before training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..errors import UsageError
from . import values
from .common import app, err, fail


@app.command()
def inspect(
    script: Annotated[
        Path,
        typer.Argument(
            help="Model script (see README: Model scripts), or a run directory: the structure "
            "it recorded."
        ),
    ],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a CONFIG value (repeatable).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the structure as JSON on stdout.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for building the model.")] = 0,
) -> None:
    """Show the detected structure: blocks, branches, norm placement, attention heads."""
    from ..store.rundir import is_run_dir

    try:
        if script.is_dir() and is_run_dir(script):
            if set_:
                raise UsageError(
                    "--set changes a model script's CONFIG; a run's structure is as recorded",
                    hint=f"stabscope inspect {script}",
                )
            _inspect_run(script, as_json)
            return
        values.seed(seed)
        _inspect(script, set_ or [], as_json, seed)
    except UsageError as e:
        raise fail(e) from None


def _inspect_run(run_dir: Path, as_json: bool) -> None:
    """The structure a run recorded (meta.json's ``structure``), as ``inspect`` shows a
    script's."""
    import json

    from ..report.structure_tree import print_structure
    from ..store.structure import Structure

    meta = values.run_meta(run_dir)
    recorded = meta.get("structure")
    if not isinstance(recorded, dict):
        raise UsageError(
            f"{run_dir} recorded no structure",
            hint="a run records its structure at its first recorded step",
        )
    if as_json:
        typer.echo(json.dumps(recorded, indent=1))
        return
    structure = Structure.from_dict(recorded)
    model = meta.get("model_type") or "the model"
    title = f"{model} recorded in {run_dir} ({len(structure.blocks)} blocks)"
    print_structure(structure, title, err)


def _inspect(script: Path, sets: list[str], as_json: bool, seed: int) -> None:
    import json

    from ..drivers.profile import build_for_inspection
    from ..drivers.script import load_script, parse_set
    from ..report.structure_tree import print_structure
    from ..structure import discover

    loaded = load_script(script, parse_set(sets))
    model, forward = build_for_inspection(loaded, seed)
    structure = discover(model, forward)
    if as_json:
        typer.echo(json.dumps(structure.to_dict(), indent=1))
        return
    title = f"{type(model).__name__} from {script.name} ({len(structure.blocks)} blocks)"
    print_structure(structure, title, err)


@app.command()
def amplification(
    script: Annotated[Path, typer.Argument(help="Model script whose CONFIG has 'depth'.")],
    depths: Annotated[str, typer.Option(help="Comma-separated depths.")] = "6,12,24,48",
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Run directory \\[default: runs/SCRIPT-amplification]"),
    ] = None,
    seeds: Annotated[int, typer.Option(help="Perturbations averaged per depth.")] = 5,
    delta: Annotated[float, typer.Option(help="Perturbation size per weight.")] = 1e-4,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a CONFIG value (repeatable).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a run in --out.")] = False,
) -> None:
    """Output change under a δ-perturbation of every weight, against depth (Admin)."""
    from ..drivers.amplification import run_amplification
    from ..drivers.script import load_script, parse_set
    from ..store.rundir import NestedRunError, RunExistsError, run_dir_error

    run_dir = out or Path("runs") / f"{script.stem}-amplification"
    try:
        try:
            depth_list = [int(d) for d in depths.split(",") if d.strip()]
        except ValueError:
            raise UsageError(f"bad --depths {depths!r}", hint="e.g. --depths 6,12,24") from None
        values.positive_int(seeds, "--seeds", "5")
        values.positive_finite(delta, "--delta", "1e-4")
        loaded = load_script(script, parse_set(set_ or []))
        result = run_amplification(loaded, depth_list, run_dir, seeds, delta, device, force)
    except (RunExistsError, NestedRunError) as e:
        raise fail(run_dir_error(e, run_dir)) from None
    except UsageError as e:
        raise fail(e) from None
    from rich.table import Table

    table = Table(title="mean squared output change after a δ-perturbation of every weight")
    table.add_column("depth N", justify="right")
    table.add_column("E[ΔF²]", justify="right")
    table.add_column("std over seeds", justify="right")
    for n, c, s in zip(result.depths, result.change, result.spread):
        table.add_row(str(n), f"{c:.4g}", f"{s:.2g}")
    err.print(table)
    err.print(
        f"fit against N: R² {result.fit_n.r2:.3f}; against log N: R² "
        f"{result.fit_log_n.r2:.3f} -> grows like [bold]{result.better}[/] "
        "(theory: N for Post-LN, log N for Pre-LN)"
    )
    err.print(f"run directory: [bold]{escape(str(result.run_dir))}[/]", soft_wrap=True)
