"""Opening runs for the report: meta, readable parts, names, and the depth axis.

Everything that can be wrong with a run that still holds something worth drawing (a corrupt
part, a part with another schema, a run still being written, no rows yet) becomes a warning
on the run, so the report renders what it can and says what it left out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..analysis.summary import layer_modules
from ..errors import UsageError
from ..store import SCHEMA_VERSION, NotARunError, RunMeta, list_parts, load_meta
from ..store.rundir import RunState, run_state

ROOT = "<root>"


@dataclass
class Run:
    """One run directory as the report sees it."""

    name: str
    path: Path
    meta: RunMeta
    files: list[Path]
    warnings: list[str] = field(default_factory=list)
    rows: int = 0  # in the readable parts, from their footers
    layers: list[str] = field(default_factory=list)  # the depth axis, shallow to deep
    depth_source: str = ""  # where the depth axis came from, said in the report
    state: RunState | None = None  # meta's status with a `running` run told apart

    @property
    def status(self) -> str:
        if self.state is not None:
            return self.state.status
        return self.meta.status

    @property
    def structure(self) -> dict[str, Any] | None:
        return self.meta.structure


def open_run(path: str | Path, name: str) -> Run:
    """Read a run's meta and list its parts; raises ``UsageError`` for a non-run."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{path} is not a directory", hint="pass run directories")
    try:
        meta = load_meta(path)
    except NotARunError as err:
        hint = "pass a directory written by `stabscope profile` or stabscope.Recorder"
        raise UsageError(str(err), hint=getattr(err, "hint", hint)) from None
    parts = list_parts(path)
    run = Run(name, path, meta, parts.files, parts.notes, parts.rows)
    version = meta.schema_version
    if isinstance(version, int) and version > SCHEMA_VERSION:
        run.warnings.append(
            f"{name}: written with run format {version}, this stabscope reads {SCHEMA_VERSION}; "
            "showing what it can read"
        )
    run.state = run_state(path, meta)
    if run.state.status == "running" or run.state.incomplete:
        run.warnings.append(
            f"{name}: {run.state.detail}; the report shows the parts written so far"
        )
    if not parts.files:
        if run.state.status == "running":
            why = "no parts written yet"
        elif meta.rows:  # meta.json counts rows that no part on disk holds now
            why = f"meta.json counts {meta.rows:,} rows written; their parts are gone"
        else:
            why = "no parts written"
        run.warnings.append(f"{name}: no readable rows ({why})")
    run.layers, run.depth_source = depth_axis(meta)
    return run


def run_names(paths: list[Path]) -> list[str]:
    """Short distinct names for the legend: the directory name, with parents added
    until the names differ (``a/run`` and ``b/run``)."""
    parts = [p.resolve().parts for p in paths]
    for keep in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-keep:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{n} ({i})" for i, n in enumerate(names)]


def depth_axis(meta: Mapping[str, Any]) -> tuple[list[str], str]:
    """Modules that stand for the layers, shallow to deep, and where the order came from:
    the detected blocks, else the layer-level modules, else the forward order."""
    meta = RunMeta.of(meta)
    if meta.blocks:
        return meta.blocks, "detected blocks"
    layers = layer_modules(meta)
    if layers:
        return sorted(layers, key=lambda n: layers[n]), "layer-indexed modules"
    ordered = [
        m for m in meta.modules if m.get("forward_order") is not None and m.get("name") != ROOT
    ]
    ordered.sort(key=lambda m: m["forward_order"])
    return [str(m["name"]) for m in ordered], "forward order"


def owner_layer(name: str, layers: dict[str, int]) -> int | None:
    """Position of the layer a module or parameter belongs to (its longest layer prefix)."""
    while name:
        if name in layers:
            return layers[name]
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return None


_NUMBER = re.compile(r"\d+")


def name_pattern(name: str) -> str:
    """The name with its numbers replaced: modules of one kind share it (``blocks.#.attn``)."""
    return _NUMBER.sub("#", name)


def depth_order(names: list[str], layers: list[str], forward: dict[str, int]) -> list[list[str]]:
    """Modules grouped by kind (name pattern), each group ordered by depth, then forward
    order; groups come in the order of their first member. Rows of a heatmap are these
    groups one after another, so no row bin mixes an attention branch with an MLP branch."""
    position = {n: i for i, n in enumerate(layers)}

    def key(name: str) -> tuple[float, float, str]:
        layer = owner_layer(name, position)
        return (
            float("inf") if layer is None else layer,
            forward.get(name, float("inf")),
            name,
        )

    groups: dict[str, list[str]] = {}
    for name in sorted(names, key=key):
        groups.setdefault(name_pattern(name), []).append(name)
    return list(groups.values())


def forward_sorted(names: list[str], layers: list[str], forward: dict[str, int]) -> list[str]:
    """Modules in the order the forward pass ran them (``forward_order`` of the module table),
    e.g. the residual branches as the stream meets them: attention, MLP, next layer's
    attention. Modules without a recorded order come last, in ``depth_order``."""
    by_depth = [n for group in depth_order(names, layers, forward) for n in group]
    rank = {n: i for i, n in enumerate(by_depth)}
    return sorted(by_depth, key=lambda n: (forward.get(n, float("inf")), rank[n]))


def forward_positions(meta: Mapping[str, Any]) -> dict[str, int]:
    """Forward order of each module that ran, from the module table."""
    return {
        str(m["name"]): int(m["forward_order"])
        for m in RunMeta.of(meta).modules
        if m.get("forward_order") is not None
    }
