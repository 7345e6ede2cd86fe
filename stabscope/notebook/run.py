"""``Run``: one run directory for a notebook, read with the functions the CLI uses.

- ``table(metric=, module=, step=, phase=)``: ``load_run``'s DataFrame;
- ``meta``: the typed ``RunMeta``;
- ``findings()``: what ``stabscope report`` shows (the last ``check``'s findings.json while it
  is current, else the rules run now in memory; nothing is written into the run);
- ``figure(name)``: the report's plotly figure of that name (``figures()`` lists them);
- ``summary()``: the headline numbers of ``stabscope summary``;
- ``_repr_html_``: the headline numbers and the findings, which Jupyter shows for ``run``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from ..analysis.summary import Summary, summarize
from ..errors import UsageError, warn
from ..rules.gate import Verdict, judge
from ..store import RunMeta, load_meta, load_run
from ..store.findings import Finding
from ..store.layout import META_FILE, PARTS_DIR
from ..store.reader import StepSelection
from .display import run_html

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from ..report.data import RunData


class Run:
    """A recorded run (see the module docstring). Opening checks that ``path`` is a run;
    everything else is read when asked, so a run still being written shows its latest."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        load_meta(self.path)  # NotARunError / MetaError (with a hint) for a non-run
        self._data: RunData | None = None
        self._stamp: tuple[int, tuple[str, ...]] | None = None

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def meta(self) -> RunMeta:
        """meta.json as the typed ``RunMeta`` (one property per key, with its default)."""
        return load_meta(self.path)

    def table(
        self,
        metric: str | list[str] | None = None,
        module: str | list[str] | None = None,
        step: StepSelection = None,
        phase: str | None = None,
        merge_ranks: bool = False,
    ) -> pd.DataFrame:
        """The run's long table, ``load_run(path, modules=module, metrics=metric, ...)``:
        names or glob patterns (``module="blocks.*.attn"``), a step, range or list."""
        return load_run(
            self.path, modules=module, metrics=metric, steps=step, phase=phase,
            merge_ranks=merge_ranks,
        )  # fmt: skip

    def verdict(self) -> Verdict:
        """The findings with where they came from (``source``) and rules that raised."""
        return judge(self.path)

    def findings(self) -> list[Finding]:
        """The rules' findings, worst first, as ``stabscope report`` shows them."""
        return self.verdict().findings

    def summary(self) -> Summary:
        """The headline numbers ``stabscope summary`` prints."""
        return summarize(self.path)

    def figures(self) -> list[str]:
        """The names ``figure`` takes for this run: the report's layer x step heatmaps
        (``act_rms``, ``grad_rms``, ``attn_entropy``, ``update_ratio``, ...) and its
        run-level lines (``loss``, ``lr``, ``model_update``, ...) that the run has."""
        from ..report.named import figure_names

        return figure_names([self._report_data()])

    def figure(self, name: str) -> go.Figure:
        """The plotly figure the report draws as ``fig-NAME``, built from the same data."""
        from ..report.named import named_figure

        fig = named_figure([self._report_data()], name)
        if fig is None:
            raise UsageError(
                f"{self.name} has no figure {name!r}",
                hint=f"one of: {', '.join(self.figures()) or 'none (no rows yet)'}",
            )
        return fig

    def _repr_html_(self) -> str:
        verdict = self.verdict()
        return run_html(self.summary(), verdict.findings, verdict.source)

    def _report_data(self) -> RunData:
        """The report's two passes over the parts, again only when the run changed."""
        from ..report.build import read_runs

        stamp = self._changes()
        if self._data is None or stamp != self._stamp:
            (data,), notes = read_runs([self.path])
            for note in notes:
                warn(note, stacklevel=3)
            self._data, self._stamp = data, stamp
        return self._data

    def _changes(self) -> tuple[int, tuple[str, ...]]:
        parts = self.path / PARTS_DIR
        names = tuple(sorted(p.name for p in parts.iterdir())) if parts.is_dir() else ()
        return (self.path / META_FILE).stat().st_mtime_ns, names


def open_run(path: str | Path) -> Run:
    """A recorded run for a notebook; raises ``NotARunError`` when ``path`` is not one."""
    return Run(path)
