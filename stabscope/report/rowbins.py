"""The rows of a heatmap: modules ordered by depth, with consecutive modules of one kind
merged into one row (``blocks.4–7.attn``) when there are more than a screen holds."""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class RowBins:
    """Consecutive rows of one kind merged so a heatmap keeps at most a screen's rows."""

    order: list[str]  # every member, in row order
    starts: np.ndarray  # position in ``order`` where each row starts
    labels: list[str]

    def row_of(self) -> dict[str, int]:
        bounds = np.r_[self.starts, len(self.order)]
        return {
            name: row
            for row in range(len(self.labels))
            for name in self.order[bounds[row] : bounds[row + 1]]
        }


def span_label(first: str, last: str) -> str:
    """``blocks.4.attn`` .. ``blocks.7.attn`` -> ``blocks.4–7.attn``."""
    if first == last:
        return first
    a, b = re.split(r"(\d+)", first), re.split(r"(\d+)", last)
    differ = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if len(a) == len(b) and len(differ) == 1 and a[differ[0]].isdigit():
        i = differ[0]
        return "".join([*a[:i], f"{a[i]}–{b[i]}", *a[i + 1 :]])
    return f"{first} … {last}"


def row_bins(groups: Sequence[Sequence[str]], max_rows: int) -> RowBins:
    """Rows for ``groups`` of names (each ordered by depth); when there are more than
    ``max_rows`` names, each group is cut into runs of consecutive names, with a number of
    rows in proportion to its size, and a run never crosses from one group to the next."""
    total = sum(len(g) for g in groups)
    order: list[str] = []
    starts: list[int] = []
    labels: list[str] = []
    for group in groups:
        n = len(group)
        if not n:
            continue
        k = n if total <= max_rows else max(1, min(n, (max_rows * n) // total))
        cut = (np.arange(k + 1) * n) // k
        for lo, hi in itertools.pairwise(cut):
            starts.append(len(order) + int(lo))
            labels.append(span_label(group[lo], group[hi - 1]))
        order.extend(group)
    return RowBins(order, np.array(starts, np.int64), labels)
