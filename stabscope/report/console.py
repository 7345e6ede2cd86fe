"""Rich rendering of a run ``Summary`` for the terminal."""

from __future__ import annotations

import os
import re
import runpy
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from ..analysis.summary import Summary
from ..store.findings import Finding
from .findings import evidence

STATUS_STYLE = {
    "complete": "green",
    "failed": "red",
    "running": "yellow",
    "interrupted": "yellow",
    "stopped": "red",
    "killed": "red",
    "unfinished": "red",
}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


#: Frames of these files ran the script (stabscope's driver, runpy); the rest are the
#: script's own and those of the libraries it called.
_RUNNER_FILES = (
    str(Path(__file__).resolve().parents[1]) + os.sep,  # not a sibling "stabscope_exp/"
    runpy.__file__,
    "<frozen runpy>",
)
_FRAME = re.compile(r'\s*File "([^"]*)"')


def script_frames(traceback: object) -> list[str]:
    """A saved traceback (meta.json's ``error.traceback``: the lines of
    ``traceback.format_exception``) without the frames of the code that ran the script."""
    if not isinstance(traceback, list):
        return []
    kept = []
    for entry in traceback:
        frame = _FRAME.match(str(entry))
        if frame is None or not frame.group(1).startswith(_RUNNER_FILES):
            kept.append(str(entry))
    return kept


def print_summary(summary: Summary, console: Console) -> None:
    """A short summary: status, loss, gradient extremes, depth trend, non-finite values."""
    s = summary
    style = STATUS_STYLE.get(s.status, "white")
    console.print(
        f"[bold]run[/] {escape(str(s.run_dir))}  [{style}]{escape(s.status)}[/]  steps {s.steps} "
        f"(recorded {s.recorded_steps}), {s.rows:,} rows",
        soft_wrap=True,
    )
    if s.status_detail:
        console.print(f"[{style}]{escape(s.status_detail)}[/]")
    if s.structure is not None:
        console.print(f"structure: {escape(s.structure)}", soft_wrap=True)
    if s.loss_first is not None:
        console.print(
            f"loss {_fmt(s.loss_first)} at step {s.loss_first_step} -> {_fmt(s.loss_last)} "
            "(mean of the last tenth)"
        )
    if s.largest:
        # One line per module, the whole name: a table would cut names to the terminal's
        # width ("model.layers.3.self_att…") and two layers would read the same.
        console.print(f"{s.extremes_metric} at step {s.extremes_step}:")
        width = max(len(name) for name, _ in [*s.largest, *s.smallest])
        for label, rows in (("largest ", s.largest), ("smallest", s.smallest)):
            for name, value in rows:
                line = f"  {label} {escape(name.ljust(width))}  {_fmt(value)}"
                console.print(line, soft_wrap=True)
    for t in (s.trend, s.param_trend):
        if t is None:
            continue
        console.print(
            f"depth trend of {t.metric} over {len(t.layers)} layers (step {t.step}): "
            f"{t.direction}; {_fmt(t.values[0])} at layer {t.layers[0]} -> "
            f"{_fmt(t.values[-1])} at layer {t.layers[-1]} (x{t.first_to_last:.3g}, "
            f"x{t.factor_per_layer:.3g} per layer)"
        )
    for line in s.headlines:
        console.print(escape(line), soft_wrap=True)
    if s.first_nonfinite:
        for direction, where in s.first_nonfinite.items():
            console.print(
                f"[red]first non-finite ({escape(direction)}):[/] {escape(str(where['module']))} "
                f"(call {where['call']}) at step {where['step']}",
                soft_wrap=True,
            )
    elif s.loss_nonfinite_step is not None:
        console.print(
            "[red]no module output or gradient went non-finite; the loss did at step "
            f"{s.loss_nonfinite_step}[/]"
        )
    else:
        console.print("no non-finite values recorded")
    for kind, names in (s.never_fired or {}).items():
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            # A gradient hook sits on a module's output: it stays silent when that output
            # does not reach the loss (a GRU's sequence output when only its last state is
            # used) or is changed in place, though the module's parameters may still train;
            # gradients taken with torch.autograd.grad are left out (record/grad_calls.py).
            why = (
                " (no gradient w.r.t. their outputs: unused by the loss, changed in place, or "
                "taken with torch.autograd.grad, whose gradients are not recorded)"
            )
            why = why if kind == "grad" else ""
            console.print(
                f"[yellow]{escape(kind)} hooks never fired{why}:[/] {escape(shown)}",
                soft_wrap=True,
            )
    for note in s.notes:
        console.print(f"[yellow]note:[/] {escape(str(note))}", soft_wrap=True)
    if s.error:
        error = f"{s.error.get('type')}: {s.error.get('message')}"
        console.print(f"[red]error:[/] {escape(error)}", soft_wrap=True)
        frames = script_frames(s.error.get("traceback"))
        if frames:  # where the script raised, as Python would have printed it
            console.print(escape("".join(frames).rstrip("\n")), style="dim", soft_wrap=True)


def print_findings(
    findings: list[Finding] | None, console: Console, shown: int = 10, note: str | None = None
) -> None:
    """The rules' findings, worst first, the same headline list as the HTML report; ``note``
    says where they came from when not from the run's findings.json."""
    if note:
        console.print(f"[dim]findings: {escape(note)}[/]", soft_wrap=True)
    if findings is None:
        console.print("findings: no rules have run on this run (no findings.json)")
        return
    if not findings:
        console.print("findings: none")
        return
    colour = {"error": "red", "warning": "yellow"}
    console.print(f"[bold]findings[/] ({len(findings)}), worst first:")
    for f in findings[:shown]:
        style = colour.get(f.severity, "blue")
        console.print(
            f"  [{style}]{escape(f.severity)}[/] [bold]{escape(f.rule)}[/]: {escape(f.message)}",
            soft_wrap=True,
        )
        details = [evidence(f), f"remedy: {f.remedy}" if f.remedy else "", f.citation]
        for line in filter(None, details):
            console.print(f"      [dim]{escape(line)}[/]", soft_wrap=True)
    if len(findings) > shown:
        console.print(f"  and {len(findings) - shown} more: see `stabscope report`")
