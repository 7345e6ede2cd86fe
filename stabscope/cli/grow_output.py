"""What ``stabscope grow`` shows: a bar per run while profiling, then whether each grown
model kept its base's outputs, the scaling table (also written to OUT/scaling.csv) and the
fitted exponents of a sweep."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape

from .common import err

if TYPE_CHECKING:
    import pandas as pd

    from ..drivers.grow import GrowResult
    from ..drivers.profile import ProgressFn
    from ..grow.sizes import GrowthSpec


@contextmanager
def run_bars(names: list[str], steps: int, quiet: bool) -> Iterator[Callable[[str], ProgressFn]]:
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


def print_result(
    result: GrowResult,
    run_root: Path,
    axis: str | None,
    variants: list[tuple[str, GrowthSpec, float]],
    quiet: bool = False,
) -> int:
    """The verdict per grown model; then, unless ``quiet``, the scaling table (written to
    OUT/scaling.csv either way) and what to run next. Exit 1 when a model changed."""
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
    table = _scaling(result, run_root, sizes, quiet)
    if quiet:
        return 0
    _print_table(table, axis)
    grown = [v.run_dir for v in result.variants if v.growth is not None]
    base = [v.run_dir for v in result.variants if v.growth is None]
    runs = " ".join(str(p) for p in base + grown)
    err.print(
        escape(f"next: stabscope report {runs} -o grow.html; stabscope check {grown[-1]}"),
        soft_wrap=True,
    )
    return 0


def _scaling(
    result: GrowResult, run_root: Path, sizes: dict[str, float], quiet: bool
) -> pd.DataFrame:
    """The scaling table over base and grown runs, written to OUT/scaling.csv. The size is
    the sweep factor, or for a single grow the parameter count relative to the base."""
    from ..grow.table import scaling_table, write_table

    rows = [(v.name, v.run_dir, sizes.get(v.name) or v.size) for v in result.variants]
    table = scaling_table(rows)
    path = write_table(table, run_root)
    if not quiet:
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
