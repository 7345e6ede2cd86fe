"""Rule ``run-status``: a gate must not pass a run that failed, holds nothing, or never ended.

What is known about how the run ended comes from ``store.rundir.run_state`` (meta.json's
status and the directory's lock): ``failed`` (the error is quoted), ``stopped`` (a rule's
error while it trained stopped it: ``--on-error stop``), ``interrupted`` (by which
signal), ``killed`` (status ``running`` with no live writer on this host), ``unfinished``
(status ``running``, written on another host with no live writer to be seen) or ``running``
(a live writer: the rules saw the parts written so far).
"""

from __future__ import annotations

from collections.abc import Iterator

from ..store import count_rows, list_parts
from ..store.findings import Finding
from ..store.rundir import run_state
from ..wording import first_line
from .base import Rule, RunView, finding

#: Set by ``check --allow-incomplete`` (or in ``[tool.stabscope.rules]``): a killed or
#: interrupted run is a warning instead of an error.
DEFAULTS = {"allow_incomplete": 0.0}


def _or_allow(p: dict[str, float], remedy: str, gated: str) -> str:
    """``remedy``, with the way to gate on ``gated`` alone where it was not already taken
    (``--allow-incomplete`` made this finding a warning: saying it again reads as unheard)."""
    return (
        remedy
        if p["allow_incomplete"]
        else f"{remedy}, or pass --allow-incomplete to gate on {gated}"
    )


def _run_status(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    state = run_state(view.run_dir, view.meta)
    steps = view.meta.steps_taken
    if state.status == "failed":
        error = view.meta.error or {}
        what = f"{error.get('type', 'error')}: {error.get('message', '')}".strip(": ")
        others = len(view.meta.rank_errors) - 1
        if what and others > 0:  # a multi-rank run: say where it began
            what = f"rank {error.get('rank')} failed first with {what} ({others} other "
            what += f"rank{'s' if others > 1 else ''} failed after it: meta.json's rank_errors)"
        hint = error.get("hint")
        yield finding(
            RUN_STATUS,
            "error",
            f"the run ended as failed after {steps} steps: {what or 'no error saved'}",
            value=float(steps),
            remedy=f"{hint}; then profile again"
            if hint
            else "fix the error in meta.json's `error` entry, then profile again",
        )
    elif view.meta.tool_error is not None:
        fault = view.meta.tool_error
        said = first_line(str(fault.get("message")))  # a run's kept before it was cut
        rank = f" of rank {fault['rank']}" if "rank" in fault else ""
        yield finding(
            RUN_STATUS,
            "warning" if p["allow_incomplete"] else "error",
            f"the recording{rank} stopped at step {fault.get('step')} on stabscope's own error in "
            f"{fault.get('where')} ({fault.get('type')}: {said}); the training went on "
            "unrecorded, so the rules saw only the steps before",
            value=float(steps),
            remedy=_or_allow(
                p, "report it with meta.json's tool_error.traceback", "what was recorded"
            ),
        )
    elif state.status == "stopped":
        rule = (view.meta.stopped_by or {}).get("rule", "a rule")
        yield finding(
            RUN_STATUS,
            "error",
            f"the run was {state.detail}",
            value=float(view.meta.steps),
            remedy=f"fix what {rule} found (its own finding says how), then profile again",
        )
    elif count_rows(view.run_dir) == 0:
        written = view.meta.rows
        yield finding(
            RUN_STATUS,
            "error",
            f"nothing readable (status {state.status}): meta.json counts {written:,} rows "
            "written, and no part holds a readable one"
            if written
            else f"nothing was recorded (status {state.status}): the run has no readable rows",
            value=0.0,
            remedy="the parts under parts/ are missing or damaged (a damaged one is named in a "
            "warning): restore them from a copy, or profile again"
            if written
            else "profile at least one step; check the module filters (--include/--exclude)",
        )
    elif state.incomplete:
        yield finding(
            RUN_STATUS,
            "warning" if p["allow_incomplete"] else "error",
            f"the run is incomplete: {state.detail}; the rules saw the parts written before",
            value=float(steps),
            remedy=_or_allow(p, "profile it again to the end", "what was recorded"),
        )
    elif state.status == "running":
        yield finding(
            RUN_STATUS,
            "warning",
            f"the run is {state.detail}: the rules saw the parts written so far",
            value=float(steps),
            remedy="check it again once training ends",
        )
    yield from _damaged_parts(view, p)
    yield from _unrecorded_training(view)


def _unrecorded_training(view: RunView) -> Iterator[Finding]:
    """Optimizers that stepped on parameters outside the recorded model (meta.json
    ``unrecorded_training``: a second model trained after the first, a student after its
    teacher, the real training after a learning-rate finder on a copy): the verdict is on
    the recorded model's training alone. A warning: what was recorded is sound."""
    for entry in view.meta.doc.get("unrecorded_training") or []:
        yield finding(
            RUN_STATUS,
            "warning",
            f"part of the training was not recorded: another optimizer ({entry['optimizer']}) "
            f"stepped {entry['steps']} times from step {entry['from_step']} on parameters "
            "outside the recorded model; the findings are on the recorded model alone",
            value=float(entry["steps"]),
            remedy="train each model in a script of its own, or give the model you want "
            "judged a stabscope.Recorder",
        )


def _damaged_parts(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    """Parts that cannot be read (truncated, another schema): their rows are lost to every
    rule, so the verdict is on part of the run; an error, as for an incomplete run. A run
    with no readable row at all is the case above."""
    parts = list_parts(view.run_dir)
    if not parts.skipped or not parts.files:
        return
    names = ", ".join(path.name for path, _ in parts.skipped[:3])
    more = f" and {len(parts.skipped) - 3} more" if len(parts.skipped) > 3 else ""
    yield finding(
        RUN_STATUS,
        "warning" if p["allow_incomplete"] else "error",
        f"{len(parts.skipped)} of {len(parts.skipped) + len(parts.files)} parts cannot be "
        f"read ({names}{more}): their rows are lost and the rules saw the rest",
        value=float(len(parts.skipped)),
        remedy=_or_allow(p, "restore the parts from a copy or profile again", "the readable parts"),
    )


RUN_STATUS = Rule(
    "run-status",
    "Failed, empty, stopped or unfinished run",
    "",
    (),
    DEFAULTS,
    _run_status,
    online=False,  # how the run ended
)
