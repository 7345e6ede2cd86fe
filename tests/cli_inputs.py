"""What the bad-input tests share: a real run whose names hold rich markup, the CLI runner,
the one-error-line check, and run snapshots to show nothing was lost."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stabscope.cli import app

runner = CliRunner()

# Module names with rich markup in them: an nn.ModuleDict key may be any string without dots.
BRACKET_MODEL = textwrap.dedent("""
    import torch
    from torch import nn

    CONFIG = {"lr": 1e-2}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleDict({"[/]": nn.Linear(4, 8), "x[bold]": nn.Linear(8, 2)})

        def forward(self, x):
            return self.blocks["x[bold]"](torch.relu(self.blocks["[/]"](x)))

    def model(cfg):
        return Net()

    def batches(cfg):
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)

    def loss(m, b):
        x, y = b
        return (m(x) - y).pow(2).mean()
""")

# A training script whose top-level code leaves a marker: running it at all would show.
MARKED_TRAINING = textwrap.dedent("""
    import pathlib
    import torch
    from torch import nn

    pathlib.Path(__file__).with_name("MARKER").write_text("trained")
    net = nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(4, 3)).pow(2).mean().backward()
        opt.step()
""")


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def one_error(res, *needles: str) -> None:
    """Exit 2, one ``error:`` line and one ``hint:`` line, no traceback."""
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["error", "hint"], res.stderr
    assert "Traceback" not in res.output
    for needle in needles:
        assert needle in res.stderr, res.stderr


def record_bracket_run(root: Path) -> Path:
    """A real 3-step run of ``net[red].py`` in ``root/runs/exp[lr=1e-3]``."""
    script = root / "net[red].py"
    script.write_text(BRACKET_MODEL)
    out = root / "runs" / "exp[lr=1e-3]"
    res = invoke("profile", script, "--steps", 3, "--out", out, "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert f"run directory: {out} " in res.stderr  # verbatim, brackets and all
    assert "blocks.[/]" in res.stderr and "blocks.x[bold]" in res.stderr  # the summary table
    return out


def copy_run(run: Path, to: Path) -> Path:
    return Path(shutil.copytree(run, to))


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of a run and its bytes."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A real tmpfs mounted at ``path`` (read-only, or tiny to fill): skipped where this
    process may not mount."""
    path.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]
    if shutil.which("mount") is None or subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("needs permission to mount a tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)
