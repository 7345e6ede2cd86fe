"""Headline numbers of a run, for the terminal: read from the run directory, no torch.

- loss at the start and over the last tenth of the steps;
- the modules with the largest and smallest gradient rms at the first recorded step;
- the depth trend of gradient rms across layers (a log-linear fit per layer index);
- the first non-finite value in forward and backward order;
- hooks that never fired.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..metrics import headlines, worse_end
from ..store import RUN_MODULE, RunMeta, load_meta, load_run
from ..store.findings import strict_json
from ..store.rundir import run_state
from .losses import first_nonfinite_loss

ROOT = "<root>"


def owner_module(parameter: str) -> str:
    """The name of the module that holds ``parameter`` directly (``ROOT`` for the model's
    own parameters)."""
    return parameter.rpartition(".")[0] or ROOT


@dataclass(repr=False)
class DepthTrend:
    """log10(rms) ≈ intercept + slope·layer over the layer-level modules."""

    metric: str
    step: int
    layers: list[int]
    values: list[float]
    first_to_last: float  # value at the last layer / value at the first

    @cached_property
    def factor_per_layer(self) -> float:
        """10**slope of the fit, over the layers with a positive finite value. Fitted when
        first asked: the rules read trends at thousands of steps and never ask."""
        x, y = np.array(self.layers, float), np.array(self.values, float)
        ok = np.isfinite(y) & (y > 0)
        slope = np.polyfit(x[ok], np.log10(y[ok]), 1)[0] if ok.sum() >= 2 else float("nan")
        return float(10**slope)

    def __repr__(self) -> str:
        return (
            f"DepthTrend(metric={self.metric!r}, step={self.step!r}, layers={self.layers!r}, "
            f"values={self.values!r}, factor_per_layer={self.factor_per_layer!r}, "
            f"first_to_last={self.first_to_last!r})"
        )

    @property
    def direction(self) -> str:
        if self.first_to_last == math.inf:
            return "grows toward the output from exactly 0 at the first layer"
        if not math.isfinite(self.first_to_last):
            return "non-finite"
        if self.first_to_last > 2:
            return "grows toward the output"
        if self.first_to_last < 0.5:
            return "shrinks toward the output"
        return "roughly flat"


@dataclass
class Summary:
    run_dir: Path
    status: str
    steps: int
    recorded_steps: int
    rows: int
    loss_first: float | None = None
    loss_first_step: int = 0  # a run recorded from a later step (a model found late) starts there
    loss_last: float | None = None
    loss_nonfinite_step: int | None = None  # the first step whose loss was NaN/Inf
    extremes_metric: str | None = None
    extremes_step: int | None = None
    largest: list[tuple[str, float]] = field(default_factory=list)
    smallest: list[tuple[str, float]] = field(default_factory=list)
    trend: DepthTrend | None = None
    param_trend: DepthTrend | None = None
    first_nonfinite: dict[str, Any] = field(default_factory=dict)
    never_fired: dict[str, list[str]] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    status_detail: str | None = None  # what is known beyond the status word (killed by what)
    structure: str | None = None
    notes: list[str] = field(default_factory=list)
    headlines: list[str] = field(default_factory=list)


def summary_record(s: Summary) -> dict[str, Any]:
    """The summary as a JSON object (``stabscope summary --json``): every field, the depth
    trends with their fitted factor per layer, non-finite numbers as null (strict JSON)."""
    record = asdict(s)
    record["run_dir"] = str(s.run_dir)
    for key, trend in (("trend", s.trend), ("param_trend", s.param_trend)):
        if trend is not None:
            record[key]["factor_per_layer"] = trend.factor_per_layer
    return dict(strict_json(record))


def _alike(group: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The members of a numbered container that make a stack of layers: those with
    parameters, of the type most of them share (the convolutions of a ``Sequential(conv, norm,
    act, conv, norm, act)``). A small ``Sequential(norm, act, conv)`` inside a U-Net stage
    numbers a norm 0 and a convolution 2: not two layers of one stack, and its one
    convolution is no stack at all."""
    owning = [m for m in group if m.get("params", 1) > 0]
    counts: dict[str, int] = {}
    for m in owning:
        counts[str(m.get("type"))] = counts.get(str(m.get("type")), 0) + 1
    if not counts:
        return []
    common = max(counts, key=lambda t: counts[t])
    alike = [m for m in owning if str(m.get("type")) == common]
    # Lookups are no stack: an embedding takes integer ids, never the float output of the
    # layer before it, so a numbered list of tables (a recommender's one per feature, a
    # ModuleList of Embedding or EmbeddingBag) sits side by side at one depth.
    return [] if all(m.get("role") == "embedding" for m in alike) else alike


def layer_modules(meta: Mapping[str, Any]) -> dict[str, int]:
    """Modules that stand for a whole layer: the residual blocks structure discovery found,
    else those of role ``block``, else the shallowest modules that carry a layer index
    (``layers.3`` rather than ``layers.3.fc``). Blocks are grouped by the container that
    numbers them: a hierarchical model's stages each hold a stack of their own, of one
    width, and the trend is read over the longest (the last among equals)."""
    found = {b.get("name") for b in (meta.get("structure") or {}).get("blocks") or []}
    # A found block need not carry a number in its name (a ModuleDict's "layer0", "low").
    mods = [m for m in RunMeta.of(meta).modules if m.get("layer") is not None or m["name"] in found]
    blocks = [m for m in mods if m["name"] in found] or [
        m for m in mods if m.get("role") == "block"
    ]
    if not blocks and mods:
        shallowest = min(m.get("depth", 0) for m in mods)
        blocks = [m for m in mods if m.get("depth", 0) == shallowest]
    # Encoder-decoder models number layers twice; keep the group with the most layers and,
    # among equals, the one that runs last (the decoder: the stack the head reads, where the
    # depth theory applies; an encoder the task barely uses gets gradients only through
    # cross-attention, vanishing toward its input on a healthy run).
    groups: dict[str, list[dict[str, Any]]] = {}
    for m in blocks:
        prefix = m["name"].rsplit(".", 1)[0] if "." in m["name"] else ""
        groups.setdefault(prefix, []).append(m)
    groups = {k: g for k, g in ((k, _alike(g)) for k, g in groups.items()) if len(g) >= 2}
    if not groups:
        return {}

    def runs_last(group: list[dict[str, Any]]) -> int:
        orders = [m.get("forward_order") for m in group]
        return max((o for o in orders if o is not None), default=-1)

    best = max(groups.values(), key=lambda g: (len(g), runs_last(g)))
    # A module that never ran has forward_order None: placed after those that ran.
    order = sorted(
        best, key=lambda m: (m.get("forward_order") is None, m.get("forward_order") or 0)
    )
    rank = {m["name"]: k for k, m in enumerate(order)}
    return {m["name"]: _position(m, rank[m["name"]]) for m in best}


def _position(module: Mapping[str, Any], order: int) -> int:
    """A layer's index in its own stack: the number its name ends with (``h.3``, a
    ModuleDict's ``layer3``). The first number (``layer``) is the stage's in a hierarchical
    model (``stages.2.0`` and ``stages.2.1`` are both layer 2), the same as the last in a flat
    stack. A block whose name ends in none (``stages.low``) is placed by ``order``, its rank
    in its stack's forward order."""
    ending = re.search(r"(\d+)$", str(module["name"]).rsplit(".", 1)[-1])
    if ending:
        return int(ending.group(1))
    return int(module["layer"]) if module.get("layer") is not None else order


def depth_trend(frame: pd.DataFrame, layers: dict[str, int], metric: str) -> DepthTrend | None:
    """Fit log10(metric) against layer index at the first recorded step that has it."""
    sub = frame[(frame.metric == metric) & frame.module.isin(list(layers))]
    if sub.empty:
        return None
    step = int(sub.step.min())
    # A module called several times a step (an ODE's vector field, an unrolled cell): its
    # largest call, as the summary's largest/smallest lines read it.
    per_module = sub[sub.step == step].groupby("module", observed=True).value.max().dropna()
    x = np.array([layers[str(m)] for m in per_module.index], float)
    y = per_module.to_numpy(float)
    order = np.argsort(x)
    return trend_of(metric, step, x[order], y[order])


def trend_of(metric: str, step: int, x: np.ndarray, y: np.ndarray) -> DepthTrend | None:
    """The trend of ``y`` (values per layer, float) over ``x`` (layer indices, ascending)."""
    if len(x) < 2:
        return None
    # NaN unless both ends are finite and the first is positive: a ratio of non-finite norms
    # is not a depth trend. A first layer at exactly 0 under a last one that is not is the
    # limit of vanishing toward the input (a deep sigmoid stack's gradients underflow to 0
    # there): infinite growth toward the output.
    finite = bool(np.isfinite(y[[0, -1]]).all())
    if finite and y[0] > 0:
        first_to_last = float(y[-1] / y[0])
    elif finite and y[0] == 0 and y[-1] > 0:
        first_to_last = math.inf
    else:
        first_to_last = math.nan
    return DepthTrend(metric, step, x.astype(int).tolist(), y.tolist(), first_to_last)


def _unexpectedly_silent(meta: RunMeta) -> dict[str, list[str]]:
    """meta.json's hooks that never fired, less the forward hooks of every
    ``nn.MultiheadAttention``'s ``out_proj``: torch's attention multiplies by that weight
    directly and never calls the module, in every model that uses it (the run keeps them)."""
    types = {m["name"]: m.get("type") for m in meta.modules}
    never = dict(meta.hooks_never_fired)
    never["forward"] = [
        n
        for n in never.get("forward", [])
        if not (
            n.endswith(".out_proj") and types.get(n[: -len(".out_proj")]) == "MultiheadAttention"
        )
    ]
    return never


#: Module classes whose output is their input, or a scaled copy of it (name prefixes).
PASS_ON = ("Identity", "Dropout", "AlphaDropout", "FeatureAlphaDropout")


def summarize(run_dir: str | Path, top: int = 3) -> Summary:
    """The headline numbers of a run (see module docstring)."""
    meta = load_meta(run_dir)
    state = run_state(run_dir, meta)  # a `running` run: still running, or killed
    s = Summary(
        Path(run_dir),
        state.status,
        meta.steps,
        meta.recorded_steps,
        meta.rows,
        first_nonfinite=meta.first_nonfinite,
        never_fired=_unexpectedly_silent(meta),
        error=meta.error,
        status_detail=state.detail if state.detail != state.status else None,
    )
    loss = load_run(
        run_dir, modules=[RUN_MODULE], metrics=["loss"], phase="train", merge_ranks=True
    )
    if not loss.empty:
        ordered = loss.sort_values("step")
        values = ordered.value.to_numpy(float)
        s.loss_first, s.loss_first_step = float(values[0]), int(ordered.step.iloc[0])
        # A loss that overflowed while every module stayed finite is said as such.
        first_bad = first_nonfinite_loss(loss)
        s.loss_nonfinite_step = None if first_bad is None else first_bad[0]
        tail = values[-max(1, len(values) // 10) :]
        # A diverged run's last tenth can be all NaN: its mean is NaN, without numpy's warning.
        s.loss_last = math.nan if np.isnan(tail).all() else float(np.nanmean(tail))
    metrics = ["grad_rms", "act_rms"]
    frame = load_run(run_dir, metrics=metrics, phase="train", merge_ranks=True)
    frame = frame[(frame.module != ROOT) & (frame.module != RUN_MODULE)]
    # Modules that pass their input on (an Identity, a Dropout: a scaled copy, the same at
    # p = 0) repeat a neighbour's statistics: not listed among the extremes.
    copies = {m["name"] for m in meta.modules if str(m.get("type", "")).startswith(PASS_ON)}
    for metric in metrics:
        sub = frame[frame.metric == metric]
        if sub.empty:
            continue
        first = int(sub.step.min())
        at = sub[sub.step == first].groupby("module", observed=True).value.max().dropna()
        at = at[~at.index.isin(copies)].sort_values(ascending=False)
        s.extremes_metric, s.extremes_step = metric, first
        s.largest = [(str(k), float(v)) for k, v in at.head(top).items()]
        # From the modules not listed as largest: a model of fewer than 2 x top modules
        # lists each once.
        rest = at.iloc[len(s.largest) :]
        s.smallest = [(str(k), float(v)) for k, v in rest.tail(top)[::-1].items()]
        s.trend = depth_trend(frame, layer_modules(meta), metric)
        break
    s.param_trend = layer_param_grad_trend(run_dir, meta)
    s.structure = describe_structure(meta.structure)
    s.notes = meta.notes
    s.headlines = probe_headlines(run_dir)
    return s


def describe_structure(structure: dict[str, Any] | None) -> str | None:
    """One line: how many blocks of which norm placement (or why none were found)."""
    if not structure:
        return None
    blocks = structure.get("blocks", [])
    if not structure.get("recognised") or not blocks:
        return "not recognised (generic per-module statistics only)"
    counts: dict[str, int] = {}
    for b in blocks:
        stack = b.get("stack") or ""
        key = f"{stack + ' ' if stack else ''}{b.get('placement', '?')}"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {k} blocks" for k, n in counts.items())


def probe_headlines(run_dir: str | Path) -> list[str]:
    """The worst value over the whole run of each metric with a headline in the catalogue
    (the transformer probes), one line each, in catalogue order."""
    metrics = headlines()  # metric -> label, from the catalogue
    frame = load_run(run_dir, metrics=list(metrics), phase="train", merge_ranks=True)
    lines = []
    for metric, label in metrics.items():
        sub = frame[frame.metric == metric].dropna(subset=["value"])
        if sub.empty:
            continue
        lowest = worse_end(metric) == "lower"
        row = sub.loc[sub.value.idxmin() if lowest else sub.value.idxmax()]
        head = f" head {int(row['index'])}" if metric.startswith("attn") else ""
        where = "" if row.module == RUN_MODULE else f" at {row.module}{head}"
        lines.append(f"{label}: {row.value:.4g}{where}, step {int(row.step)}")
    return lines


def layer_param_grad_trends(grads: pd.DataFrame, meta: Mapping[str, Any]) -> list[DepthTrend]:
    """Per recorded step, the gradient norm of all parameters of each layer (sqrt of the sum
    of squares of ``param_grad_norm`` rows): the quantity of Xiong et al. 2020 (Fig. 3), flat
    or decaying with depth for Pre-LN, large near the output and vanishing toward the input
    for Post-LN. ``grads`` holds ``param_grad_norm`` rows; trends come in step order."""
    layers = layer_modules(meta)
    if not layers or grads.empty:
        return []
    # The layer of each distinct parameter, then of each row by its code (mapping millions
    # of rows' strings through a dict takes seconds).
    codes, modules = pd.factorize(grads.module.astype(str))
    owner_layer: list[int] = []
    for module in modules:
        owner = module.rsplit(".", 1)[0]
        while owner and owner not in layers:
            owner = owner.rsplit(".", 1)[0] if "." in owner else ""
        owner_layer.append(layers[owner] if owner else -1)
    layer = np.array(owner_layer, np.int64)[codes]
    owned = layer >= 0
    if not owned.any():  # no gradient in any layer (a frozen body under a trained head)
        return []
    layer = layer[owned]
    # Sums of squares per (step, layer), grouped by one int64 key ordered like the pair:
    # each sum adds its rows in their order, as a groupby on the two columns would.
    width = int(layer.max()) + 1 if len(layer) else 1
    key = grads.step.to_numpy().astype(np.int64)[owned] * width + layer
    by_layer = pd.Series(grads.value.to_numpy(float)[owned] ** 2).groupby(key)
    # A layer with a NaN parameter gradient has a NaN norm, not the norm of the rest (a sum
    # that skips NaN would turn an all-NaN layer into a norm of 0).
    sums = by_layer.sum().where(by_layer.count() == by_layer.size())
    steps, layer = np.divmod(sums.index.to_numpy(), width)
    layer = layer.astype(float)
    norms = np.sqrt(sums.to_numpy())
    # One trend per step, from numpy slices: a run of thousands of steps takes a second.
    starts = np.flatnonzero(np.r_[True, steps[1:] != steps[:-1]])
    trends = []
    for start, stop in zip(starts, [*starts[1:], len(steps)]):
        trend = trend_of(
            "layer_param_grad_norm", int(steps[start]), layer[start:stop], norms[start:stop]
        )
        if trend is not None:
            trends.append(trend)
    return trends


def layer_param_grad_trend(run_dir: str | Path, meta: Mapping[str, Any]) -> DepthTrend | None:
    """The per-layer gradient-norm trend at the first recorded step."""
    grads = load_run(run_dir, metrics=["param_grad_norm"], phase="train", merge_ranks=True)
    first = grads[grads.step == grads.step.min()] if not grads.empty else grads
    trends = layer_param_grad_trends(first, meta)
    return trends[0] if trends else None
