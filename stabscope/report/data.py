"""What the report draws, and collecting it from a run in two passes over its parts.

``HEATMAPS`` is the catalogue of layer x step pictures; the sections pick from it. Which
metrics a run has is read from the data (the census), so a section whose metrics are
absent is skipped with a note instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..metrics import worse_end
from ..store import RUN_MODULE
from ..store.ranks import rank0_only
from .aggregate import Census, feed, step_bins, take_census
from .grids import AtSteps, BinnedGrid, Grid, Markers, StepCount, reduce_exact
from .layer_grid import LayerGrid
from .rowbins import row_bins
from .runs import ROOT, Run, depth_order, forward_positions, forward_sorted, owner_layer


@dataclass(frozen=True)
class Heat:
    """One layer x step heatmap: ``rows`` is ``layers`` (the depth axis modules),
    ``modules`` (every module with the metric, grouped by kind and ordered by depth) or
    ``params`` (parameter rows aggregated per layer, ``how`` = ``l2`` or ``min``)."""

    key: str
    title: str
    rows: str
    log: bool = True
    how: str = "l2"

    @property
    def worst(self) -> str:
        """The end of the range that signals trouble (``hi`` or ``lo``, from the metric
        catalogue): the cell colour is that end of the cell's envelope, so a one-step
        excursion still colours its cell."""
        return "lo" if worse_end(self.key) == "lower" else "hi"


HEATMAPS = {
    h.key: h
    for h in (
        Heat("act_rms", "forward rms of each layer's output", "layers"),
        Heat("act_absmax", "forward absmax of each layer's output", "layers"),
        Heat("grad_rms", "gradient rms w.r.t. each layer's output", "layers"),
        Heat("grad_absmax", "gradient absmax w.r.t. each layer's output", "layers"),
        Heat("param_norm", "weight norm per layer", "params"),
        Heat("param_grad_norm", "weight-gradient norm per layer", "params"),
        Heat("norm_input_rms", "rms at the input of each norm", "modules"),
        Heat("token_corr", "mean correlation between tokens", "modules", log=False),
        Heat("res_omega", "Admin ω per residual branch", "modules"),
        Heat("res_ratio", "rms of the branch output / rms of the stream", "modules"),
        Heat(
            "res_dependency",
            "branch share of the variance, Var f / (α² Var x + Var f)",
            "modules",
            log=False,
        ),
        Heat(
            "res_corr",
            "correlation of the branch with the stream (−1: it cancels the stream)",
            "modules",
            log=False,
        ),
        Heat("attn_entropy", "attention entropy, lowest head", "modules", log=False),
        Heat("attn_logit_max", "attention max logit, highest head", "modules"),
        Heat("update_ratio", "update ratio ‖Δθ‖/‖θ‖ per layer", "params"),
        Heat("adam_sqrtv_over_eps", "Adam √v / ε, smallest in layer", "params", how="min"),
    )
}

SERIES = {
    "loss": RUN_MODULE,
    "lr": RUN_MODULE,
    "model_update": RUN_MODULE,
    "logit_lse_mean": ROOT,
    "logit_max": ROOT,
    "logit_min": ROOT,
    "pred_entropy": ROOT,
    "pred_marginal_entropy": ROOT,
}
NONFINITE_FLAGS = ("act_nonfinite", "grad_nonfinite", "param_nonfinite", "param_grad_nonfinite")
MARKERS = ("first_nonfinite_forward", "first_nonfinite_backward")


@dataclass(frozen=True)
class Budget:
    """Caps that bound the page: cells per heatmap, rows and columns, points per line."""

    cells: int = 40_000
    rows: int = 160
    cols: int = 240
    points: int = 1_000

    @classmethod
    def for_heatmaps(cls, count: int, total_cells: int = 720_000) -> Budget:
        """Share a page-wide cell budget among ``count`` heatmaps (12 bytes a cell with its
        hover data, so ~9 MB of data whatever the number of runs and metrics)."""
        return cls(cells=max(4_000, min(cls.cells, total_cells // max(count, 1))))

    def columns(self, rows: int, steps: int) -> int:
        return max(1, min(steps, self.cols, max(20, self.cells // max(rows, 1))))


def heat_sources(heat: Heat) -> tuple[str, ...]:
    return ("update_norm", "param_norm") if heat.key == "update_ratio" else (heat.key,)


def planned_heatmaps(census: Census) -> list[str]:
    return [k for k, h in HEATMAPS.items() if census.has(heat_sources(h)[0])]


def pick_steps(steps: np.ndarray, count: int) -> list[int]:
    """The first recorded step (init) and ``count - 1`` more, evenly spread to the last."""
    if not len(steps):
        return []
    positions = np.round(np.linspace(0, len(steps) - 1, count)).astype(int)
    return sorted({int(steps[p]) for p in positions})


@dataclass
class RunData:
    run: Run
    census: Census
    heat: dict[str, Grid] = field(default_factory=dict)
    series: dict[str, Grid] = field(default_factory=dict)
    profiles: dict[str, AtSteps] = field(default_factory=dict)  # per layer at picked steps
    layer_exact: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    heads: AtSteps | None = None  # attention entropy, modules x heads x picked steps
    beta: AtSteps | None = None  # res_beta at the first step: branches x components
    nonfinite: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    markers: dict[str, list[tuple[int, str]]] = field(default_factory=dict)


def census_of(run: Run) -> Census:
    return take_census(run.files, rank0_only(run.meta))


def collect(run: Run, census: Census, budget: Budget) -> RunData:
    """Everything the sections draw, from one more pass over the run's parts."""
    data = RunData(run, census)
    names = census.modules
    forward = forward_positions(run.meta)
    present_layers = [n for n in run.layers if n in names.ids]
    position = {n: i for i, n in enumerate(present_layers)}
    accs: list = []
    binned: dict[str, BinnedGrid] = {}
    layered: dict[str, LayerGrid] = {}
    sharded = run.meta.sharded

    def bins_for(steps: np.ndarray, rows: int):
        return step_bins(steps, budget.columns(min(rows, budget.rows), len(steps)))

    for key in planned_heatmaps(census):
        heat = HEATMAPS[key]
        metric = heat_sources(heat)[0]
        steps = census.steps(metric)
        if heat.rows == "params":
            layer_of = {}
            for p in census.modules_of(metric):
                layer = owner_layer(p, position)
                if layer is not None:
                    layer_of[p] = layer
            for source in heat_sources(heat):
                acc = LayerGrid(
                    source, layer_of, len(present_layers), names, steps, heat.how, sharded
                )
                layered[f"{key}:{source}"] = acc
                accs.append(acc)
            continue
        if heat.rows == "layers":
            with_metric = set(census.modules_of(metric))
            groups = [[n for n in present_layers if n in with_metric]]
        else:
            groups = depth_order(census.modules_of(metric), present_layers, forward)
        rows = row_bins(groups, budget.rows)
        binned[key] = BinnedGrid(metric, rows, names, bins_for(steps, len(rows.labels)))
        accs.append(binned[key])

    for metric in SERIES:
        if census.has(metric):
            steps = census.steps(metric)
            rows = row_bins([[SERIES[metric]]], 1)
            width = census.width(metric) if metric == "lr" else 1
            binned[f"series:{metric}"] = BinnedGrid(
                metric, rows, names, step_bins(steps, budget.points), width
            )
            accs.append(binned[f"series:{metric}"])

    for metric in ("act_rms", "grad_rms"):
        if census.has(metric):
            picked = pick_steps(census.steps(metric), 4)
            data.profiles[metric] = AtSteps(metric, present_layers, names, picked, 1)
            accs.append(data.profiles[metric])
    if census.has("attn_entropy"):
        modules = [
            n
            for g in depth_order(census.modules_of("attn_entropy"), present_layers, forward)
            for n in g
        ]
        picked = pick_steps(census.steps("attn_entropy"), 3)
        data.heads = AtSteps("attn_entropy", modules, names, picked, census.width("attn_entropy"))
        accs.append(data.heads)
    if census.has("res_beta"):
        # Rows in forward order: row i is the stream after branch i, whose columns are the
        # components before it (the stream entering the stack, then each branch in turn).
        modules = forward_sorted(census.modules_of("res_beta"), present_layers, forward)
        first = [int(census.steps("res_beta")[0])]
        data.beta = AtSteps("res_beta", modules, names, first, census.width("res_beta"))
        accs.append(data.beta)
    counters = [StepCount(m) for m in NONFINITE_FLAGS if census.has(m)]
    counters += [StepCount("loss", "nonfinite")] if census.has("loss") else []
    markers = [Markers(m, names) for m in MARKERS if census.has(m)]
    feed(run.files, census, [*accs, *counters, *markers], rank0_only(run.meta))

    for key, acc in binned.items():
        grid = acc.result()
        if key.startswith("series:"):
            data.series[key.split(":", 1)[1]] = grid
        else:
            data.heat[key] = grid
    _layer_heatmaps(data, layered, present_layers, budget)
    data.nonfinite = {c.metric if c.test == "nonzero" else "loss": c.result() for c in counters}
    data.markers = {m.metric: m.rows for m in markers}
    return data


def _layer_heatmaps(
    data: RunData, layered: dict[str, LayerGrid], layers: list[str], budget: Budget
) -> None:
    """Per-layer parameter aggregates: exact per step first (a layer's norm at a step needs
    all its tensors at that step), then binned like every other heatmap."""
    rows = row_bins([layers], budget.rows)
    for key in planned_heatmaps(data.census):
        if HEATMAPS[key].rows != "params":
            continue
        source = heat_sources(HEATMAPS[key])[0]
        acc = layered[f"{key}:{source}"]
        values = acc.exact()
        if key == "update_ratio":
            denominator = layered[f"{key}:param_norm"].exact()
            with np.errstate(invalid="ignore", divide="ignore"):
                values = values / denominator
        data.layer_exact[key] = (acc.steps, values)
        bins = step_bins(acc.steps, budget.columns(len(rows.labels), len(acc.steps)))
        if len(layers):
            data.heat[key] = reduce_exact(key, values, rows, bins, acc.steps)
