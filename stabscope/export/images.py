"""The report's layer x step heatmaps as PNG images for a dashboard, where per-layer lines
would be hundreds of series: rows are layers (shallow at the top), columns step bins, the
colour the worse end of each cell (viridis, log10 where the report uses a log scale; NaN and
Inf grey). Pillow comes with tensorboard and is imported here only."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..report.build import read_runs
from ..report.data import HEATMAPS

#: viridis at 0, 0.25, 0.5, 0.75, 1 (RGB), interpolated linearly between.
VIRIDIS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64
)
MISSING = (160, 160, 160)
MIN_SIDE = 240  # pixels: small grids are scaled up by whole cells


def colours(z: np.ndarray, log: bool, reverse: bool) -> np.ndarray:
    """``z`` (rows x columns) as uint8 RGB, the finite range spread over viridis."""
    with np.errstate(all="ignore"):
        v = np.where(z > 0, np.log10(z), np.nan) if log else z.astype(np.float64)
    ok = np.isfinite(v)
    rgb = np.empty((*z.shape, 3), np.uint8)
    rgb[...] = MISSING
    if ok.any():
        lo, hi = float(v[ok].min()), float(v[ok].max())
        t = (v[ok] - lo) / (hi - lo) if hi > lo else np.full(int(ok.sum()), 0.5)
        t = 1 - t if reverse else t
        x = np.linspace(0, 1, len(VIRIDIS))
        rgb[ok] = np.stack([np.interp(t, x, VIRIDIS[:, c]) for c in range(3)], -1).round()
    return rgb


def png(rgb: np.ndarray) -> tuple[bytes, int, int]:
    from PIL import Image

    scale = max(1, MIN_SIDE // max(1, min(rgb.shape[:2])))
    big = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(big, "RGB").save(buffer, format="PNG")
    return buffer.getvalue(), big.shape[0], big.shape[1]


def heatmap_pngs(run_dir: Path) -> list[tuple[str, bytes, int, int]]:
    """(metric, PNG, height, width) for each heatmap of the report that the run has."""
    (data,), _ = read_runs([run_dir])
    out = []
    for key, heat in HEATMAPS.items():
        grid = data.heat.get(key)
        if grid is None or grid.empty:
            continue
        z = grid.hi if heat.worst == "hi" else grid.lo
        out.append((key, *png(colours(z, heat.log, heat.worst == "lo"))))
    return out
