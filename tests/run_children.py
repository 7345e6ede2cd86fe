"""Real processes that write runs, for the run-lifecycle tests: a model script that trains
slowly enough to be caught mid-run, a training script that never ends, and a library Recorder
that reports each step on stdout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.conftest import ROOT

#: A model script whose batches take ``delay`` seconds each: a run lasts as long as a test
#: needs it to. Seeded by ``stabscope profile --seed`` (torch.initial_seed()).
SLOW_MODEL = textwrap.dedent(
    """
    import time
    import torch
    from torch import nn

    CONFIG = {"delay": 0.05}

    def model(cfg):
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def batches(cfg):
        g = torch.Generator().manual_seed(torch.initial_seed())
        while True:
            time.sleep(cfg.delay)
            yield torch.randn(4, 8, generator=g)

    def loss(model, batch):
        return model(batch).pow(2).mean()
    """
)

#: A training script (no model/batches/loss) that trains until it is stopped.
ENDLESS_TRAINING = textwrap.dedent(
    """
    import time
    import torch
    from torch import nn

    def main():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        while True:
            time.sleep(0.05)
            loss = model(torch.randn(4, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    if __name__ == "__main__":
        main()
    """
)

#: The start of every small-MLP child script: torch, stabscope, the tests' MLP (seed 0), its
#: Adam and its batches. ``{root}`` is filled in with ``str.format`` (so braces are doubled).
MLP_CHILD = textwrap.dedent(
    """
    import sys, time, torch
    import stabscope
    from stabscope import RecorderConfig, Schedule
    sys.path.insert(0, {root!r})
    from tests.conftest import batch_maker, mlp

    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    make = batch_maker(6, 3)
    """
)

_UNTIL_KILLED = textwrap.dedent(
    """
    rec = stabscope.Recorder(model, sys.argv[1], cfg).start()
    step = 0
    while True:  # until killed
        x, y = make(step)
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        rec.step(loss=loss)
        print(REPORT, flush=True)
        step += 1
    """
)


def mlp_until_killed(config: str, report: str) -> str:
    """A child script (still to ``str.format`` with ``root``) that trains the MLP under
    ``Recorder(model, argv[1], cfg)`` until killed: ``config`` sets ``cfg``, ``report`` is the
    expression printed after each step."""
    return MLP_CHILD + textwrap.dedent(config) + _UNTIL_KILLED.replace("REPORT", report)


#: The library Recorder on a small MLP; prints "step N parts P" after each step, and stops
#: after argv[3] steps to wait (sleeping) for a signal. argv[2]: "with" or "start" (no close).
LIBRARY_WRITER = MLP_CHILD + textwrap.dedent(
    """
    cfg = RecorderConfig(schedule=Schedule(dense=1, every=1), flush_seconds=1e9)
    rec = stabscope.Recorder(model, sys.argv[1], cfg)

    def train():
        for step in range(10**9):
            if step == int(sys.argv[3]):
                print("waiting", flush=True)
                time.sleep(600)
            x, y = make(step)
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad(); loss.backward(); opt.step()
            rec.step(loss=loss)
            print(f"step {{step}} parts {{rec.writer.parts_written}}", flush=True)

    if sys.argv[2] == "with":
        with rec:
            train()
    else:
        rec.start()
        train()
    """
)


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_python_child(code: str, *args: str, timeout: float = 600) -> dict:
    """Run ``code`` in a fresh interpreter (``child_env``) with ``args``; it must exit 0 and
    print one JSON object as its last line, which is returned."""
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_script(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def default_signals() -> None:
    """In the child, before exec: SIGINT and SIGTERM back to their defaults. A test suite run
    as a background job (``cmd &`` in a non-interactive shell) has SIGINT ignored, a child
    inherits that, and Python installs its KeyboardInterrupt handler only where SIGINT is not
    ignored: the child would never see the Ctrl-C these tests send."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def start_profile(script: Path, out: Path, *args: str) -> subprocess.Popen[str]:
    """``python -m stabscope profile SCRIPT --out OUT -q ARGS`` in the background."""
    cmd = [sys.executable, "-m", "stabscope", "profile", str(script), "--out", str(out), "-q"]
    return subprocess.Popen(
        [*cmd, *args],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_signals,
    )


def start_library_writer(out: Path, mode: str = "with", wait_at: int = 10**9):
    """The library Recorder in a child (see ``LIBRARY_WRITER``)."""
    code = LIBRARY_WRITER.format(root=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-c", code, str(out), mode, str(wait_at)],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_signals,
    )


def wait_for(condition, timeout: float = 120.0, what: str = "") -> float:
    """Poll ``condition()`` every 20 ms; the seconds it took. Fails the test on timeout."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def parts_on_disk(run: Path) -> list[Path]:
    return sorted((run / "parts").glob("part-*.parquet"))
