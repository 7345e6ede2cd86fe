"""Acting on the rules' verdicts while the run trains (a mixin of ``Recorder``).

The online rules (``rules.online``) run in a worker thread over the rows in host memory, and
at once, on the training thread, when the first non-finite value is seen in a module's output
or gradient, or in a loss synced (its rows are written first), and once at the first step
boundary at the failure forecast's horizon (10% of a known budget, ``forecast.ONLINE_FROM``).
At each step boundary where the worker is free (``OnlineVerdicts.due``) and a new row has
reached the host, the recorder hands it a snapshot, without a sync and without writing a part:

- the loss check: every loss synced so far (``losses.history``) and the pending losses
  already in host memory (a CPU loss: every step's; a loss on an accelerator waits for the
  recorder's next sync: the next recorded step or flight-recorder transfer), and the probe
  batch's losses read so far (``probe_loss``, a float each, at steps 2, 4, 8, ...), which
  tell a loss that rose with its data from a model that un-learned, as the check of the
  whole run does;
- the full check: the rows the writer buffers, those not yet handed to it, and the pending
  losses already in host memory (on CPU also the flight recorder's ring), next to the parts
  on disk.

So a verdict on a CPU loss comes within ~0.25 s of the loss that shows it, a few steps
of a short run's ~30 ms, however short the run (docs/recording.md gives the cadence and its
measurements).
At each step boundary the Recorder takes the new error findings and, for each one, once:

- records it in meta.json (``online.findings``, with ``seen_at``, the step it arrived after);
- warns (a ``StabscopeWarning``, a ``warning:`` line under the CLI);
- calls ``on_finding(finding)``;
- with ``on_error="stop"``, asks the run to stop: ``rec.should_stop`` turns true and
  ``rec.stopped_by`` holds the finding as meta.json keeps it (a dict, ``finding_entry``:
  ``rule``, ``step``, ``message``, ``seen_at``, ...). Whoever drives the loop ends it at
  this boundary (``stabscope profile``, zero-code mode, the Lightning and HF callbacks do; a
  plain loop checks ``rec.should_stop``); a run closed without another step is ``stopped``, with the
  finding in meta.json's ``stopped_by``.

A verdict never interrupts the user's own error handling: while an exception is being handled
(a step boundary inside the script's ``except`` or ``finally``) findings wait for the next
boundary, and closing a run never acts on one. With several ranks only rank 0 runs the rules,
and ``stop`` acts as ``warn`` (stopping one rank would leave the others waiting in their next
collective); meta.json notes it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import UsageError, warn
from ..rules.forecast import FORECAST, ONLINE_FROM
from ..rules.gate import load_settings
from ..rules.loss_divergence import LOSS_DIVERGENCE
from ..rules.online import (
    CLOSE_WAIT,
    FULL,
    HURRIED_CLOSE_WAIT,
    LOSS,
    ON_ERROR,
    OnlineVerdicts,
    finding_entry,
)
from ..store import interrupts
from ..store.findings import Finding
from ..store.memory import Unwritten
from . import announce
from .collector import Rows
from .losses import run_chunk

MULTI_RANK_NOTE = (
    "on_error=stop acts as warn with several ranks: stopping one rank would leave the others "
    "waiting in their next collective (stop from on_finding, with your own broadcast)"
)


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise UsageError(
            f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}",
            hint="warn reports an error finding while the run trains; stop also stops the run",
        )


class VerdictActions:
    """The online verdicts of a ``Recorder`` (module docstring)."""

    def _setup_verdicts(
        self, on_finding: Callable[[Finding], Any] | None, on_error: str, world_size: int
    ) -> list[str]:
        """Build the online rules for this run; the notes for meta.json."""
        check_on_error(on_error)
        self.on_finding = on_finding
        self.on_error = on_error
        self.stopped_by: dict[str, Any] | None = None
        self._stop_at: int | None = None  # step_index when the stop was asked for
        self._verdict_trigger = False
        self._loss_nonfinite = False  # a non-finite loss has triggered a check
        self._forecast_judged = False  # the forecast's horizon has triggered a check (or
        # never will: no online rules, or the forecast does not act; ``_setup_verdicts``)
        self._judged = {LOSS: -1, FULL: -1}  # what each check saw: see ``_new_rows``
        # The loss check reads this rank's losses: with several ranks the run's loss is
        # their mean, which only the parts hold (the full check).
        self._loss_check = world_size == 1
        self._online_found: list[dict[str, Any]] = []
        self.verdicts: OnlineVerdicts | None = None
        notes: list[str] = []
        if not self.config.online_rules or self.rank != 0:
            return notes
        if on_error == "stop" and world_size > 1:
            self.on_error = "warn"
            notes.append(MULTI_RANK_NOTE)
        try:
            settings = load_settings(None)  # [tool.stabscope.rules], as `check` reads it
        except UsageError as e:
            settings = None
            notes.append(f"online rules use their defaults: {e.message}")
        self.verdicts = OnlineVerdicts(self.run_dir, settings)
        # Nothing to trigger where the forecast does not act (disabled, or not an error).
        self._forecast_judged = not any(r.id == FORECAST.id for r in self.verdicts.rules)
        return notes

    @property
    def should_stop(self) -> bool:
        """Whether an error finding asked the run to stop (``on_error="stop"``)."""
        return self.stopped_by is not None

    def _trigger_verdicts(self) -> None:
        """Judge the run at the end of this step, on the training thread (the first
        non-finite value: the run is likely lost, and a prompt stop saves its compute)."""
        self._verdict_trigger = True

    def _judge_step(self) -> None:
        """At a step boundary, outside the step's deferred section: hand the worker what it
        has not judged yet (or check now on a trigger), and act on the findings that
        arrived."""
        verdicts = self.verdicts
        if verdicts is None or sys.exc_info()[0] is not None:
            return  # inside the user's exception handling: the next boundary acts
        last = self.losses.last  # the last loss synced
        if last is not None and not math.isfinite(last) and not self._loss_nonfinite:
            self._loss_nonfinite = self._verdict_trigger = True
        if self._forecast_due():
            self._verdict_trigger = True
        if self._verdict_trigger:
            self._verdict_trigger = False
            with interrupts.deferred():  # the rows that tripped it, on disk before the check
                # Every step's pending values too (one transfer): the forecast reads the
                # gradient norms of the steps its stability index was measured at.
                self.host_syncs += self.losses.sync(self.rows)
                self.rows.flush_to_writer()
                self.writer.flush()
                self._save_meta()
            verdicts.check_now(self._unwritten())
        else:
            jobs = {kind: make() for kind, make in self._checks_due(verdicts)}
            verdicts.submit(jobs)
        found = [f for f in verdicts.take() if self._still_holds(verdicts, f)]
        if found:
            self._act(found)

    def _still_holds(self, verdicts: OnlineVerdicts, finding: Finding) -> bool:
        """Whether a finding stands. A ``loss-divergence`` error read with a probe batch's
        reading older than the step (they come at steps 2, 4, 8, ...: at step 60, step 32's)
        is judged again with one read now, at this boundary: a loss that rose with its data
        (a policy's value targets, a curriculum) leaves the probe batch's loss where the model
        left it, and the rule says so as the check of the whole run does, at its end, with
        its last reading; a model that un-learned raises it there too."""
        probe = self.sharpness
        if finding.rule != LOSS_DIVERGENCE.id or probe is None or not probe.readings:
            return True
        if not self._loss_check:
            return True  # several ranks: their mean loss is in the parts, not this rank's rows
        now = self.step_index - 1  # the step that just ended
        if probe.readings[-1][0] >= now:
            return True
        probe.measure_loss(now, self.rows, self.probe_pause())
        return verdicts.confirm(finding, self._loss_rows())

    def _forecast_due(self) -> bool:
        """Whether this boundary is the first at the failure forecast's horizon, a share
        (``forecast.ONLINE_FROM``) of a known budget: judged there on the training thread
        once, as a trigger is, so that a short run's forecast does not wait for the worker's
        pause (a check of t seconds waits ``PAUSE`` x t for the next) and fall after its
        end."""
        if self._forecast_judged:
            return False
        budget = (self.meta.get("lr_plan") or {}).get("budget")
        if not isinstance(budget, int) or self.step_index < ONLINE_FROM * budget:
            return False
        self._forecast_judged = True
        return True

    def _checks_due(self, verdicts: OnlineVerdicts) -> list[tuple[str, Callable[[], Unwritten]]]:
        """The checks to hand over now: those that would start at once, with new rows."""
        due = []
        if self._loss_check and verdicts.due(LOSS) and self._new_rows(LOSS):
            due.append((LOSS, self._loss_rows))
        if verdicts.due(FULL) and self._new_rows(FULL):
            due.append((FULL, self._unwritten))
        return due

    def _new_rows(self, kind: str) -> bool:
        """Whether rows came since the last check of ``kind`` was handed over: for the loss
        check a loss in host memory; for the full check rows handed to the writer (a
        recorded step's, a flight-recorder transfer's: the losses alone are the loss
        check's, and a full check at every step would cost 20x a loss check for them)."""
        seen = self.losses.visible if kind == LOSS else self.writer.rows_appended
        if seen == self._judged[kind]:
            return False
        self._judged[kind] = seen
        return True

    def _loss_rows(self) -> Unwritten:
        """Every loss in host memory, and every step's ``loss_constant`` there (what
        ``loss-divergence`` reads the loss against), as the loss check reads them (no part):
        O(1) here but for the bars pending on the host."""
        train = self.writer.phases("train")
        chunks = self.losses.chunks(train, self.writer.metrics("loss"))
        if self.losses.bars.n or self.losses.has_bars_on_host:
            chunks += self.losses.bar_chunks(train, self.writer.metrics("loss_constant"))
        readings = self.sharpness.readings if self.sharpness is not None else []
        if readings:  # the probe batch's losses: a rise of the data's, not the model's
            steps = np.array([s for s, _ in readings], np.int32)
            values = np.array([v for _, v in readings], np.float32)
            metric = self.writer.metrics("probe_loss")
            chunks += (run_chunk(steps, values, train, self.losses.run_code, metric),)
        return Unwritten(chunks, self.rank, self.writer.names, with_parts=False)

    def _unwritten(self) -> Unwritten:
        """The rows no part holds: the writer's buffer, the rows not yet handed to it, and
        the pending losses and flight rows already in host memory (emitted here, not
        consumed)."""
        pending = Rows(self.writer)
        self.losses.peek(pending)
        self._every_peek(pending)  # the flight recorder's ring, on CPU
        return self.writer.unwritten(self.rows.chunks + pending.chunks)

    def _act(self, found: list[Finding]) -> None:
        seen_at = self.step_index - 1  # the step that just ended
        for f in found:
            entry = finding_entry(f, seen_at)
            self._online_found.append(entry)
            stop = self.on_error == "stop" and self.stopped_by is None
            if stop:
                self.stopped_by = entry
                self._stop_at = self.step_index
            where = f" ({f.shown_module})" if f.shown_module else ""
            at = f"step {f.step}" if f.step is not None else "the run"
            action = "; stopping the run" if stop else ""
            line = f"{f.rule}{where} at {at}, seen after step {seen_at}: {f.message}{action}"
            say = announce.printer()
            if say is not None:
                say(line)
            else:
                warn(line, stacklevel=4)  # the caller of rec.step()
        self._store_verdicts()
        if self.live is not None:  # the dashboards (record/live.py)
            for f in found:
                self.live.finding(seen_at, f)
        if self.on_finding is not None:
            for f in found:
                self.on_finding(f)

    def _store_verdicts(self) -> None:
        if self.verdicts is None:
            return
        online = self.verdicts.summary(self.on_error)
        self.meta["online"] = {**online, "findings": self._online_found}
        with interrupts.deferred():
            self._save_meta()

    def _close_verdicts(self, status: str) -> str:
        """Stop the worker and put the verdicts in meta.json; the run's status: ``stopped``
        when it ends cleanly at the boundary where a finding asked it to stop."""
        if self.verdicts is None:
            return status
        hurried = status != "complete"  # a signal or an error: its end is written first
        self.verdicts.close(wait=HURRIED_CLOSE_WAIT if hurried else CLOSE_WAIT)
        online = self.verdicts.summary(self.on_error)
        self.meta["online"] = {**online, "findings": self._online_found}
        ended_there = self._stop_at == self.step_index  # no step after the one that asked
        if status == "complete" and self.stopped_by is not None and ended_there:
            self.meta["stopped_by"] = self.stopped_by
            return "stopped"
        return status  # a run that went on after the stop was asked, or ended otherwise
