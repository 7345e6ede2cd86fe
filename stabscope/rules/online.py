"""Verdicts while a run trains: the rules whose verdict holds on a partial run (``Rule.online``),
run over the rows recorded so far.

Two checks, run by one worker thread, one at a time:

- the **loss check**: the online rules that read nothing but the loss (``loss-divergence``;
  ``loss-spike`` once configured as an error), over every loss in host memory (those synced,
  and those still pending that are already on the host: a float, a CPU tensor), read from
  memory, no part at all: 5 ms for 100 losses, 50 ms for 100,000;
- the **full check**: every online rule over the parts written so far and the rows no part
  holds yet (``store.memory.Unwritten``: the writer's buffer, and the pending losses and
  flight rows already in host memory), so a verdict never waits for a part, and no part is
  written for it.

The recorder asks for a check at a step boundary where it is ``due`` (no check queued or
running, and that check's pause over) and something new is in host memory, handing over a
snapshot of the rows taken in O(chunks) (``submit``; ``record/verdicts.py``). The worker runs
it and queues each error finding it has not reported before; the recorder takes them at the
next step boundary (``take``), on the training thread, and acts. ``check_now`` runs a full
check on the calling thread instead: for a trigger (the first non-finite value), where a
prompt verdict matters more than one step's time.

- **What acts**: findings at ``error`` after ``[tool.stabscope.rules]`` (severity, thresholds,
  ``disable``), once per (rule, module, metric): the same finding seen again in a later check,
  of either kind, is not new. Only the rules that can find an error run (``acts``): a rule
  whose worst finding is a warning (``Rule.severity``) runs once configured as an error.
- **Cost**: after a check, that kind of check waits ``PAUSE * t`` before the next, ``t`` the
  least CPU time of its last ``COSTS`` checks, so each kind uses about 1/(1 + PAUSE) of one
  core however long the run grows, and the training thread never waits for one (handing a
  check over
  costs it ~70-200 µs, a boundary with nothing to hand over ~7 µs). The loss check comes
  every ~0.25 s on a short run: every 3-8 steps of ~30 ms. Measured in
  docs/benchmarks.md.
- With several ranks there is no loss check: the run's loss is the ranks' mean, which only
  the parts hold (the recorder does not hand one over).
- **Never a crash**: a rule that raises is a ``RuleFailure`` in ``failures`` (as the gate
  reports it), and anything else a check raises is one too, under ``CHECK``; training goes on.
  Warnings the rules raise on the worker thread (numpy's NaN warnings, a skipped part) are
  dropped: the process's warning filters belong to the training thread, and ``check`` says them.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any

from ..store.findings import Finding
from ..store.memory import Unwritten
from . import ALL_RULES
from .base import Rule, RuleSettings, run_rules
from .failures import RuleFailure, isolated

#: After a check of t seconds, that kind of check waits PAUSE * t: each kind of check takes
#: at most 1/(1 + PAUSE) of one core, 2%. At 19 (5%) the checks cost the sample GPT's CPU
#: step 3.4% where torch's threads hold both cores, at 49 0.7% (docs/benchmarks.md).
PAUSE = 49.0
#: How many checks of a kind the pause looks back on: it follows the least CPU time of these.
#: One check's time is not its cost: where torch's threads hold both cores, or a garbage
#: collection runs inside it, a 5 ms loss check measured 15-18 ms, and a pause 3x as long let
#: a short diverging run go 20 steps past its divergence. A check whose cost grows with the
#: run (the losses it reads) is paced by its cost two checks back, about the same.
COSTS = 3
#: The worker thread's name; warnings raised on it are dropped (module docstring).
WORKER = "stabscope-online-rules"
#: Seconds a closing run waits for a check in progress (``close``).
CLOSE_WAIT = 60.0
#: The wait of a run closing on a signal or an error: a preemption's grace period (often 30 s
#: before SIGKILL) belongs to writing the run's end, not to a verdict.
HURRIED_CLOSE_WAIT = 5.0
#: The key of ``failures`` for a check that failed outside any one rule (meta.json unreadable).
CHECK = "(online check)"
#: The severity that acts (``--on-error``, ``on_finding``).
ACTING = "error"
#: What an acting finding does (``--on-error``, ``Recorder(on_error=)``): ``warn`` reports it,
#: ``stop`` also ends training at that step boundary.
ON_ERROR = ("warn", "stop")
#: The two kinds of check (module docstring).
LOSS, FULL = "loss", "full"
#: What the loss check holds, and the rules that read only these run its way: the losses,
#: and beside them what ``loss-divergence`` reads with them: the constant prediction's loss
#: of each step (written with the loss) and the probe batch's loss (its readings so far,
#: from the probe itself: the loss check reads no part).
LOSS_METRICS = frozenset({"loss", "loss_constant", "probe_loss"})


def online_rules(rules: list[Rule] | None = None) -> list[Rule]:
    """The rules whose verdict on the steps so far holds while the run trains."""
    return [r for r in (ALL_RULES if rules is None else rules) if r.online]


def acts(rule: Rule, settings: RuleSettings) -> bool:
    """Whether ``rule``, enabled, can find an error under ``settings``."""
    return rule.id not in settings.disabled and settings.severity_of(rule) == ACTING


def reads_only(rule: Rule, metrics: frozenset[str]) -> bool:
    """Whether everything ``rule`` reads is among ``metrics``."""
    read = set(rule.needs) | {m for request in rule.requests for m in request.metrics}
    return bool(read) and read <= metrics


def finding_key(f: Finding) -> tuple[str, str | None, str | None]:
    """What makes a finding new: its rule, module and metric (a later check may see the same
    problem at a later step, or with a larger value)."""
    return (f.rule, f.module, f.metric)


def finding_entry(f: Finding, seen_at: int) -> dict[str, Any]:
    """A finding as meta.json keeps it (``online.findings``, ``stopped_by``)."""
    return {
        "rule": f.rule,
        "severity": f.severity,
        "message": f.message,
        "module": f.module,
        "step": f.step,
        "value": f.value,
        "threshold": f.threshold,
        "metric": f.metric,
        "remedy": f.remedy,
        "seen_at": int(seen_at),
    }


class OnlineVerdicts:
    """The online rules over one run directory (module docstring)."""

    def __init__(
        self,
        run_dir: str | Path,
        settings: RuleSettings | None = None,
        rules: list[Rule] | None = None,
        pause: float = PAUSE,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.settings = settings or RuleSettings()
        # Only a rule that can find an error can act: a warning rule is not run (Rule.severity
        # is the severity of a rule's worst finding), unless configured to be an error.
        self.rules = [r for r in online_rules(rules) if acts(r, self.settings)]
        self.loss_rules = [r for r in self.rules if reads_only(r, LOSS_METRICS)]
        self.pause = pause
        self.checks = {LOSS: 0, FULL: 0}
        self.seconds = 0.0  # time spent in checks, on whichever thread
        self.failures: dict[str, RuleFailure] = {}
        self._seen: set[tuple[str, str | None, str | None]] = set()
        self._ready: list[Finding] = []
        self._lock = threading.Lock()  # guards _ready, _seen, _jobs and the counters
        self._checking = threading.Lock()  # one check at a time
        self._wake = threading.Event()
        self._closed = False
        self._busy = False  # a submitted check is queued or running
        self._jobs: dict[str, Unwritten | None] = {}
        self._not_before = {LOSS: 0.0, FULL: 0.0}
        self._costs: dict[str, deque[float]] = {k: deque(maxlen=COSTS) for k in (LOSS, FULL)}
        self._thread: threading.Thread | None = None

    # -- the training thread -----------------------------------------------------------------
    def due(self, kind: str) -> bool:
        """Whether a check of ``kind`` handed over now starts at once: no check is queued or
        running, and its pause is over. Two reads, no lock: cheap at every step boundary."""
        if self._closed or self._busy or time.monotonic() < self._not_before[kind]:
            return False
        return bool(self.loss_rules) if kind == LOSS else True

    def submit(self, jobs: dict[str, Unwritten | None]) -> None:
        """Check the run in the background over the parts and the rows of ``jobs``
        (``LOSS``: the losses alone, ``FULL``: what no part holds yet, None: the parts
        alone), loss check first."""
        if self._closed or not jobs:
            return
        with self._lock:
            self._jobs.update(jobs)
            self._busy = True
        if self._thread is None:
            _drop_worker_warnings()
            self._thread = threading.Thread(target=self._loop, name=WORKER, daemon=True)
            self._thread.start()
        self._wake.set()

    def check_now(self, memory: Unwritten | None = None) -> None:
        """A full check on this thread now (after a check in progress, if any)."""
        if not self._closed:
            self._check(FULL, memory)

    def confirm(self, finding: Finding, memory: Unwritten) -> bool:
        """Whether ``finding``'s rule, run now on this thread over ``memory`` (the loss
        check's rows) alone, still finds it at ``error``; where it does not, the finding may
        be reported again by a later check."""
        rules = [r for r in self.loss_rules if r.id == finding.rule]
        result, failure = isolated(
            lambda: run_rules(self.run_dir, rules, self.settings, memory=memory)
        )
        if failure is not None or result is None or not rules:
            return True  # it cannot be judged again: it stands
        key = finding_key(finding)
        if any(f.severity == ACTING and finding_key(f) == key for f in result.findings):
            return True
        with self._lock:
            self._seen.discard(key)
        return False

    def take(self) -> list[Finding]:
        """The new acting findings since the last call, in the order they were found."""
        if not self._ready:  # no lock on the common path: a list's truth is atomic
            return []
        with self._lock:
            found, self._ready = self._ready, []
        return found

    def close(self, wait: float = CLOSE_WAIT) -> None:
        """Stop the worker, waiting ``wait`` seconds at most for a check in progress.

        Why wait: a daemon thread still inside pandas, pyarrow or torch when the interpreter
        finalizes is ended by ``pthread_exit`` as it takes the GIL back, and the unwind
        through their C++ frames aborts the process ("terminate called without an active
        exception", exit 134) after the user's script has finished. A check is one rule pass
        over the run (about a second on a 200-step GPT), so the wait is short; a check still
        running after ``wait`` is left to the daemon thread rather than hang the user's
        exit."""
        self._closed = True
        self._wake.set()
        if self._thread is not None and wait > 0 and self._thread is not threading.current_thread():
            self._thread.join(wait)

    def summary(self, on_error: str) -> dict[str, Any]:
        """meta.json's ``online`` block, without its findings."""
        with self._lock:
            return {
                "on_error": on_error,
                "checks": self.checks[FULL] + self.checks[LOSS],
                "loss_checks": self.checks[LOSS],
                "seconds": round(self.seconds, 4),
                "rule_errors": {k: str(v) for k, v in self.failures.items()},
            }

    # -- the worker --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while not self._closed:
                with self._lock:
                    kind = next((k for k in (LOSS, FULL) if k in self._jobs), None)
                    if kind is None:
                        self._busy = False
                        break
                    memory = self._jobs.pop(kind)
                self._check(kind, memory)
            if self._closed:
                return

    def _check(self, kind: str, memory: Unwritten | None) -> None:
        rules = self.loss_rules if kind == LOSS else self.rules
        with self._checking:
            t0, cpu0 = time.perf_counter(), time.thread_time()
            result, failure = isolated(
                lambda: run_rules(self.run_dir, rules, self.settings, memory=memory)
            )
            spent = time.perf_counter() - t0
            # The pause follows the core time the check took, not its wall time: a check that
            # waited for the GIL, held by the training thread, did not take that time from it.
            self._costs[kind].append(time.thread_time() - cpu0)
            self._not_before[kind] = time.monotonic() + self.pause * min(self._costs[kind])
            with self._lock:
                self.checks[kind] += 1
                self.seconds += spent
                if failure is not None:
                    self.failures[CHECK] = failure
                    return
                assert result is not None
                self.failures.update(result.failed)
                for f in result.findings:
                    if f.severity == ACTING and finding_key(f) not in self._seen:
                        self._seen.add(finding_key(f))
                        self._ready.append(f)


_previous_showwarning: Any = None


def _drop_worker_warnings() -> None:
    """Drop warnings raised on the worker thread, once per process: ``catch_warnings`` would
    change the filters of every thread for the length of a check (module docstring)."""
    global _previous_showwarning
    if _previous_showwarning is not None:
        return
    _previous_showwarning = warnings.showwarning

    def show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
        if threading.current_thread().name == WORKER:
            return
        _previous_showwarning(message, category, *args, **kwargs)

    warnings.showwarning = show
