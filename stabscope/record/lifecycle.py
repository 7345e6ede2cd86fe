"""How a recorded run opens and closes (a mixin of ``Recorder``).

Opening writes meta.json (status ``running``), takes SIGINT/SIGTERM where their handlers are
Python's defaults, registers the optimizer step hooks and arms step 0. Closing removes every
hook, writes every buffered row, finishes meta.json with the status, and lets go of the run
directory's lock and the signal handlers; it also runs at interpreter exit if nobody closed
the run, so a signal or a forgotten ``close()`` loses no buffered row.
"""

from __future__ import annotations

import atexit
import contextlib
import time
from typing import Any, TypeVar

from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from ..errors import RunWriteError
from ..store import interrupts
from ..store import lock as locks
from ..store.rank_errors import merge_rank_errors, write_rank_error, write_rank_fault
from ..structure import discover
from . import clip_sites, grad_calls, model_samples, warning_display
from .hook_context import eager
from .run_meta import error_entry
from .tool_faults import FAULTS, fault_note

_Run = TypeVar("_Run", bound="RunLifecycle")

OPENED_LATE_NOTE = (
    "the run was opened by the first rec.step(): step 0 ran before the run opened and has only "
    "its loss; open the run before the first step (`with Recorder(...)` or `rec.start()`)"
)


WRITE_RECOVERED_NOTE = (
    "a write failed while the run trained (a full disk); it was tried again later and every "
    "row reached the disk"
)


class RunLifecycle:
    """start/close, the context manager, and the last-resort close at exit."""

    def __enter__(self: _Run) -> _Run:
        try:
            self.start()
        except BaseException as err:  # __exit__ is not called when __enter__ raises
            self.close(interrupts.ending_status(err), error=err)
            raise
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        # KeyboardInterrupt and SIGTERM close the run as `interrupted`, anything else `failed`.
        self.close(interrupts.ending_status(exc), error=exc)

    def start(self: _Run) -> _Run:
        """Write meta.json (status ``running``), register optimizer hooks, arm step 0.

        Also takes SIGINT and SIGTERM where their handlers are Python's defaults and this is
        the main thread (``store/interrupts.py``), and closes the run at interpreter exit if
        nobody did: a signal, or a script that forgot ``close()``, loses no buffered row."""
        if self._started:
            return self
        self._started = True
        FAULTS.reset()  # a new run: no fault of stabscope's own yet (tool_faults.py)
        FAULTS.step = self.step_index  # zero-code: the steps before the model was found
        warning_display.install()  # the script's warnings once per location, as without us
        self._signals = interrupts.install()
        atexit.register(self._close_at_exit)
        if self.structure is None and self.forward is not None:
            self.structure = discover(self.model, self.forward)  # a forward: Ctrl-C may stop it
        with interrupts.deferred():
            if self.structure is not None:
                self._build_structure_probes()
            if not self._plan_at_optimizer_step:
                self._plan_lr()
            self._save_meta()
            self._optimizer_hooks = [
                register_optimizer_step_pre_hook(eager(self._before_optimizer_step)),
                register_optimizer_step_post_hook(eager(self._after_optimizer_step)),
            ]
            clip_sites.listen(self.step_norms.on_clip)
            self.step_norms.watch()
            grad_calls.watch()
            grad_calls.listen(self._on_grad_call)
            model_samples.listen(self._on_model_sample)
            if self._plan_at_optimizer_step:
                # Opened by the first step(): that step's forward, backward and optimizer step
                # have run unseen, and its weights are already the next step's. Only its loss
                # is recorded; recording starts with the next step.
                self.meta["notes"].append(OPENED_LATE_NOTE)
            else:
                self._arm(self.step_index)
        return self

    def close(self, status: str = "complete", error: BaseException | None = None) -> None:
        """Remove every hook, write what is left, and finish meta.json. Safe to call twice.

        ``status`` is ``complete`` only if every row reached the disk: when rows could not
        be written (a full disk, now or while the run trained) the run is ``failed``, with
        the write error in meta.json (``write_error``, and ``error`` unless another error
        ended the run). A write error is warned about, never raised: the training it
        watched, and the user's code after it (saving the model), go on. A signal that
        arrives while closing waits until the run is closed."""
        if self._closed:
            return
        self._closed = True
        with interrupts.deferred():
            self._detach_all()
            probe = self.sharpness
            if status == "complete" and probe is not None and probe.last_loss_step is not None:
                # The probe batch's loss with the final weights (``probe_loss``), for the
                # run's end level, where it was read during training (an optimizer stepped);
                # the hooks are off, so one forward is all it costs.
                probe.measure_loss(self.step_index - 1, self.rows)
            write_error = self._write_remaining()
            status = self._close_verdicts(status)  # `stopped` by a finding
            if self.live is not None:
                self.live.close()  # the last steps, then the dashboards' own close
            if write_error is not None:
                status = "failed"
                self.meta["write_error"] = error_entry(write_error)
                error = write_error if error is None else error
            elif isinstance(error, RunWriteError):  # a write during training ended the run
                self.meta["write_error"] = error_entry(error)
            elif self._write_warned:  # the disk had room again: every row is on disk
                self.meta["notes"].append(WRITE_RECOVERED_NOTE)
            if FAULTS.error is not None:  # read by run-status: the recording stopped early
                self.meta["tool_error"] = FAULTS.error
                self.meta["notes"].append(fault_note(FAULTS.error))
            self.meta["status"] = status
            self.meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            if error is not None:
                self.meta["error"] = error_entry(error)
            self._share_rank_error(status)
            signum = interrupts.interrupting_signal(error) or interrupts.received()
            if status == "interrupted" and signum is not None:
                self.meta["interrupted_by"] = interrupts.signal_name(signum)
            if self._reserve is not None:
                self._reserve.release()  # its room is for this last meta.json
            try:
                self._save_meta()
            except RunWriteError as err:  # the disk is full even for the reserve's room
                self._on_write_error(err)
            finally:
                self._let_go()
        if write_error is not None:
            self._on_write_error(write_error)

    def _share_rank_error(self, status: str) -> None:
        """Only rank 0 writes meta.json: another rank that failed leaves its error beside it
        (the cause, where rank 0's own is the knock-on), one whose recording a fault of
        stabscope's own stopped leaves that, and rank 0 takes in those already there
        (store/rank_errors.py)."""
        if self.rank != 0:
            with contextlib.suppress(OSError):  # its console still has the error
                if status == "failed" and self.meta.get("error"):
                    write_rank_error(self.run_dir, self.rank, status, self.meta["error"])
                if FAULTS.error is not None:  # its recording stopped early
                    write_rank_fault(self.run_dir, self.rank, FAULTS.error)
            return
        merged = merge_rank_errors(self.meta, self.run_dir)
        if merged is not self.meta:
            self.meta.clear()
            self.meta.update(merged)

    def _detach_all(self) -> None:
        self._stop_capture()
        if self.structure_probes is not None:
            self.structure_probes.detach()
        self.hooks.detach()
        for probe in self.core.values():
            probe.release()
        for probe in self.every.values():
            probe.release()
        for handle in self._optimizer_hooks:
            handle.remove()
        self._optimizer_hooks.clear()
        clip_sites.unlisten(self.step_norms.on_clip)
        grad_calls.unlisten(self._on_grad_call)
        grad_calls.unwatch()
        model_samples.unlisten(self._on_model_sample)
        self.step_norms.release()

    def _write_remaining(self) -> BaseException | None:
        """Write every buffered row; the error that kept rows off the disk, if any (also
        one from while the run trained, when the rows it held back are still lost)."""
        try:
            # A step that was started but never marked is discarded, not half-written.
            self.collector.clear()
            self._every_close()
            self.host_syncs += self.losses.sync(self.rows)
            self.rows.flush_to_writer()
            self.writer.flush()
        except BaseException as err:
            return err
        lost = self.writer.lost_rows
        if lost and self.writer.write_error is not None:
            err = self.writer.write_error
            return RunWriteError(
                err.errno, f"{err.strerror or err}; {lost:,} rows not written", err.filename
            )
        return None

    def _let_go(self) -> None:
        """Release the directory's lock and the signal handlers; the run is closed."""
        if self._lock is not None:
            locks.release(self.run_dir, self)
            self._lock = None
        if self._signals:
            interrupts.uninstall()
            self._signals = False
        atexit.unregister(self._close_at_exit)

    def _close_at_exit(self) -> None:
        if interrupts.received() is not None:
            self.close("interrupted")
        else:
            self.close("failed", RuntimeError("the process ended before the run was closed"))
