"""What a monitoring tool must survive without harming the run it watches, on real training
scripts profiled through the CLI in a fresh interpreter: a script that changes directory, one
that builds a new optimizer every step, one that swallows the exception that stops it, a
program that turns warnings into errors, a model script that raises, a damaged part."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import stabscope
from tests.conftest import ROOT
from tests.run_children import child_env

pytestmark = pytest.mark.slow

#: A small classifier trained STEPS steps; {body} is the loop's extra line(s) at step i, and
#: the script logs each step's loss to losses.json in the directory it started in.
SCRIPT = """
import json, os, torch
from torch import nn
import torch.nn.functional as F
torch.manual_seed(0)
start = os.getcwd()
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
opt = torch.optim.AdamW(model.parameters(), 1e-2)
g = torch.Generator().manual_seed(1)
data = [(torch.randn(32, 8, generator=g), torch.randint(4, (32,), generator=g))
        for _ in range(4)]
losses = []
for i in range({steps}):
    x, y = data[i % 4]
{body}
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
json.dump(losses, open(os.path.join(start, "losses.json"), "w"))
"""


def script(tmp_path, body: str, steps: int = 8, name: str = "train.py"):
    path = tmp_path / name
    path.write_text(SCRIPT.format(steps=steps, body=textwrap.indent(body, "    ")))
    return path


def profile(tmp_path, path, *args: str) -> subprocess.CompletedProcess:
    """``stabscope profile`` run from tmp_path with ``--out run`` (relative), in a child."""
    cmd = [sys.executable, "-m", "stabscope", "profile", str(path), "--out", "run", *args]
    return subprocess.run(
        cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300
    )


def recorded_losses(run) -> list[float]:
    df = stabscope.load_run(run, metrics="loss").sort_values("step")
    return df.value.tolist()


def test_a_script_that_changes_directory_keeps_every_step_in_its_run(tmp_path):
    """Hydra's ``hydra.job.chdir=True`` moves the working directory after the model is
    found: a relative --out still receives every part, and nothing lands elsewhere."""
    (tmp_path / "elsewhere").mkdir()
    path = script(tmp_path, 'if i == 3:\n    os.chdir("elsewhere")')
    proc = profile(tmp_path, path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = stabscope.read_meta(tmp_path / "run")
    assert meta["status"] == "complete" and meta["steps"] == 8
    own = json.loads((tmp_path / "losses.json").read_text())
    assert recorded_losses(tmp_path / "run") == pytest.approx(own, rel=1e-6)
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_a_new_optimizer_every_step_gives_one_step_each(tmp_path):
    """Each step's optimizer replaces the last (which is freed): every step ends at its
    optimizer's step, the recorded losses are the script's own, meta.json holds the last
    optimizer's settings, and --stop-script fires."""
    body = "opt = torch.optim.AdamW(model.parameters(), 1e-2 / (i + 1))"
    proc = profile(tmp_path, script(tmp_path, body))
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = stabscope.read_meta(tmp_path / "run")
    assert meta["steps"] == 8 and len(meta["optimizers"]) == 1
    assert meta["optimizers"][0]["groups"][0]["lr"] == pytest.approx(1e-2 / 8)
    own = json.loads((tmp_path / "losses.json").read_text())
    assert recorded_losses(tmp_path / "run") == pytest.approx(own, rel=1e-6)
    proc = profile(tmp_path, script(tmp_path, body), "--force", "--max-steps", "3", "--stop-script")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert stabscope.read_meta(tmp_path / "run")["steps"] == 3
    assert recorded_losses(tmp_path / "run") == pytest.approx(own[:3], rel=1e-6)


#: A script whose step 5 feeds a NaN batch: its head, up to the loop, and one step's body
#: (indented for the loop), for the tests of --on-error stop.
NAN_AT_5_HEAD = textwrap.dedent(
    """
    import torch
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), 1e-2)
    for i in range(12):
    """
)
NAN_AT_5_STEP = textwrap.indent(
    textwrap.dedent(
        """\
        x = torch.randn(32, 8) * (float("nan") if i == 5 else 1.0)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        """
    ),
    "    ",
)


def test_a_script_that_swallows_the_stop_still_ends_stopped(tmp_path):
    """--on-error stop raises at the step boundary after the NaN; a bare ``except:`` around
    the step trains on. The run still closes `stopped` there, and profile exits 1."""
    path = tmp_path / "swallow.py"
    step = textwrap.indent(NAN_AT_5_STEP, "    ")
    path.write_text(
        f"{NAN_AT_5_HEAD}    try:\n{step}"
        "    except:  # noqa: E722  (the script's own: it logs and trains on)\n"
        "        print('swallowed', i)\n"
    )
    proc = profile(tmp_path, path, "--on-error", "stop")
    assert proc.returncode == 1, proc.stderr[-2000:]
    meta = stabscope.read_meta(tmp_path / "run")
    assert meta["status"] == "stopped" and meta["stopped_by"]["rule"] == "nonfinite"
    assert meta["steps"] == 6  # steps 0-5: the NaN at step 5, seen at its boundary
    assert any("caught the exception that stopped it" in n for n in meta["notes"])


def test_a_stopped_script_is_told_where_in_its_step_it_stopped(tmp_path):
    """--on-error stop ends the script from inside the optimizer step of the step that shows
    the NaN (step 5), after its update: the script's own line after ``opt.step()`` ran for
    steps 0-4 only (its stdout is the reference), and meta.json's notes say why."""
    path = tmp_path / "stopped.py"
    path.write_text(f"{NAN_AT_5_HEAD}{NAN_AT_5_STEP}    print('after', i)\n")
    proc = profile(tmp_path, path, "--on-error", "stop")
    assert proc.returncode == 1, proc.stderr[-2000:]
    printed = [line for line in proc.stdout.splitlines() if line.startswith("after")]
    assert printed == [f"after {i}" for i in range(5)]
    meta = stabscope.read_meta(tmp_path / "run")
    assert meta["status"] == "stopped" and meta["steps"] == 6  # step 5 was trained
    assert any("from inside the last step's optimizer.step()" in n for n in meta["notes"])


def test_warnings_as_errors_never_end_a_recorded_loop(tmp_path):
    """A program under ``warnings.simplefilter("error")`` (pytest -W error): the live finding
    of a NaN is a line on stderr, not an exception out of rec.step()."""
    code = textwrap.dedent(
        f"""
        import sys, warnings, torch
        sys.path.insert(0, {str(ROOT)!r})
        import stabscope
        from torch import nn
        warnings.simplefilter("error")
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), 0.1)
        with stabscope.Recorder(model, sys.argv[1]) as rec:
            for i in range(8):
                x = torch.randn(16, 4) * (float("nan") if i == 2 else 1.0)
                loss = model(x).pow(2).mean()
                opt.zero_grad(); loss.backward(); opt.step()
                rec.step(loss=loss)
        print("trained", rec.step_index)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "run")],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("trained 8")
    assert "warning: nonfinite" in proc.stderr


def test_a_model_script_error_keeps_the_users_frames(tmp_path):
    path = tmp_path / "model_script.py"
    path.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            calls = {"n": 0}

            def model(cfg):
                return nn.Linear(4, 2)

            def batches(cfg):
                while True:
                    yield torch.randn(8, 4)

            def loss(m, x):
                calls["n"] += 1
                if calls["n"] == 4:
                    raise ValueError("bad batch in user code")
                return m(x).pow(2).mean()
            """
        )
    )
    proc = profile(tmp_path, path, "--steps", "10")
    assert proc.returncode == 2
    assert "`stabscope summary` of the run shows its traceback" in proc.stderr
    trace = "".join(stabscope.read_meta(tmp_path / "run")["error"]["traceback"])
    assert 'model_script.py", line 16, in loss' in trace
    assert trace.rstrip().splitlines()[-1].startswith("stabscope.errors.ScriptError")


def test_a_damaged_part_fails_the_gate(tmp_path):
    proc = profile(tmp_path, script(tmp_path, "", steps=30), "--dense", "30")
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "run"
    parts = sorted((run / "parts").glob("part-*.parquet"))
    assert len(parts) >= 2, parts
    parts[0].write_bytes(parts[0].read_bytes()[:500])  # truncated: the footer is gone
    check = [sys.executable, "-m", "stabscope", "check", str(run), "--format", "json"]
    out = subprocess.run(check, env=child_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    found = {f["rule"]: f for f in json.loads(out.stdout)["findings"]}
    assert found["run-status"]["severity"] == "error"
    assert f"1 of {len(parts)} parts cannot be read" in found["run-status"]["message"]
    out = subprocess.run(
        [*check, "--allow-incomplete"], env=child_env(), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout[-2000:]
