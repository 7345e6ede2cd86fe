"""Verdicts while a run trains: the rules whose verdict holds on a partial run (``Rule.online``),
run over the parts written so far.

The recorder calls ``landed()`` each time a part reaches the disk. A worker thread then runs the
online rules over the run directory (the parts and meta.json are written atomically, so it never
reads half a file) and queues each error finding it has not reported before; the recorder takes
them at the next step boundary (``take``), on the training thread, and acts. ``check_now`` runs a
check on the calling thread instead: for a trigger (the first non-finite value), where a prompt
verdict matters more than one step's time.

- **What acts**: findings at ``error`` after ``[tool.stabscope.rules]`` (severity, thresholds,
  ``disable``), once per (rule, module, metric): the same finding seen again in a later check is
  not new.
- **Cost**: one check reads the run so far (one pass, as ``check`` does). The worker runs one
  check at a time, and after a check that took ``t`` seconds it waits ``PAUSE * t`` before the
  next, so it uses at most 1/(1 + PAUSE) of one core however long the run grows; parts that land
  meanwhile are read by the next check. Measured in docs/benchmarks.md.
- **Never a crash**: a rule that raises is a ``RuleFailure`` in ``failures`` (as the gate
  reports it), and anything else a check raises is one too, under ``CHECK``; training goes on.
  Warnings the rules raise on the worker thread (numpy's NaN warnings, a skipped part) are
  dropped: the process's warning filters belong to the training thread, and ``check`` says them.
"""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path
from typing import Any

from ..store.findings import Finding
from . import ALL_RULES
from .base import Rule, RuleSettings, run_rules
from .failures import RuleFailure, isolated

#: After a check of t seconds the worker waits PAUSE * t: at most 1/(1 + PAUSE) of one core.
PAUSE = 19.0
#: The worker thread's name; warnings raised on it are dropped (module docstring).
WORKER = "stabscope-online-rules"
#: The key of ``failures`` for a check that failed outside any one rule (meta.json unreadable).
CHECK = "(online check)"
#: The severity that acts (``--on-error``, ``on_finding``).
ACTING = "error"
#: What an acting finding does (``--on-error``, ``Recorder(on_error=)``): ``warn`` reports it,
#: ``stop`` also ends training at that step boundary.
ON_ERROR = ("warn", "stop")


def online_rules(rules: list[Rule] | None = None) -> list[Rule]:
    """The rules whose verdict on the steps so far holds while the run trains."""
    return [r for r in (ALL_RULES if rules is None else rules) if r.online]


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
        self.rules = online_rules(rules)
        self.pause = pause
        self.checks = 0
        self.seconds = 0.0  # time spent in checks, on whichever thread
        self.failures: dict[str, RuleFailure] = {}
        self._seen: set[tuple[str, str | None, str | None]] = set()
        self._ready: list[Finding] = []
        self._lock = threading.Lock()  # guards _ready, _seen and the counters
        self._checking = threading.Lock()  # one check at a time
        self._wake = threading.Event()
        self._closed = False
        self._not_before = 0.0
        self._thread: threading.Thread | None = None

    # -- the training thread -----------------------------------------------------------------
    def landed(self) -> None:
        """A part reached the disk: check the run in the background, soon."""
        if self._closed:
            return
        if self._thread is None:
            _drop_worker_warnings()
            self._thread = threading.Thread(target=self._loop, name=WORKER, daemon=True)
            self._thread.start()
        self._wake.set()

    def check_now(self) -> None:
        """Check on this thread now (after a check in progress, if any)."""
        if not self._closed:
            self._check()

    def take(self) -> list[Finding]:
        """The new acting findings since the last call, in the order they were found."""
        if not self._ready:  # no lock on the common path: a list's truth is atomic
            return []
        with self._lock:
            found, self._ready = self._ready, []
        return found

    def close(self, wait: float = 0.0) -> None:
        """Stop the worker; ``wait`` seconds at most for a check in progress."""
        self._closed = True
        self._wake.set()
        if self._thread is not None and wait > 0:
            self._thread.join(wait)

    def summary(self, on_error: str) -> dict[str, Any]:
        """meta.json's ``online`` block, without its findings."""
        with self._lock:
            return {
                "on_error": on_error,
                "checks": self.checks,
                "seconds": round(self.seconds, 4),
                "rule_errors": {k: str(v) for k, v in self.failures.items()},
            }

    # -- the worker --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._wake.wait()
            if self._closed:
                return
            delay = self._not_before - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # parts landing meanwhile are read by this check
            self._wake.clear()
            if self._closed:
                return
            self._check()

    def _check(self) -> None:
        with self._checking:
            t0 = time.perf_counter()
            result, failure = isolated(lambda: run_rules(self.run_dir, self.rules, self.settings))
            spent = time.perf_counter() - t0
            self._not_before = time.monotonic() + self.pause * spent
            with self._lock:
                self.checks += 1
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
