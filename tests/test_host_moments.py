"""The single-pass CPU moment kernel (numba) against plain torch formulas, and the row
accumulator that mixes it with the device path in firing order."""

import math
import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from stabscope.probes.kernels import host_kernels, host_moments
from stabscope.probes.moments import MomentRows, decode_moments, moment_vector
from stabscope.record.collector import Collector, Rows

pytestmark = pytest.mark.skipif(not host_kernels.AVAILABLE, reason="numba is not installed")


def host_vector(t: torch.Tensor) -> np.ndarray:
    out = np.empty(4)
    host_moments.host_moments_into(t, out)
    return out


def decoded(vector: np.ndarray, numel: int) -> dict[str, float]:
    return {k: float(v[0]) for k, v in decode_moments(vector[None], np.array([numel])).items()}


# Sizes on both sides of the thread split and of the kernel's 8192-element blocks.
@pytest.mark.parametrize("size", [1, 100, 8193, host_kernels.PARALLEL_FROM + 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_matches_reference(size, dtype):
    gen = torch.Generator().manual_seed(size)
    x = (torch.randn(size, generator=gen) * 3 + 0.5).to(dtype)
    got = decoded(host_vector(x), size)
    ref = x.double()
    assert got["mean"] == pytest.approx(ref.mean().item(), rel=1e-5, abs=1e-6)
    assert got["rms"] == pytest.approx(ref.pow(2).mean().sqrt().item(), rel=1e-6)
    assert got["absmax"] == ref.abs().max().item()  # exact: a maximum is one element
    assert got["nonfinite"] == 0


def test_non_contiguous_and_negative_extreme():
    x = torch.randn(300, 400, generator=torch.Generator().manual_seed(3)).t()  # a strided view
    x[17, 5] = -9.25  # the largest magnitude is negative
    got = decoded(host_vector(x), x.numel())
    assert got["absmax"] == 9.25
    assert got["mean"] == pytest.approx(x.double().mean().item(), rel=1e-6, abs=1e-9)
    assert got["rms"] == pytest.approx(x.double().pow(2).mean().sqrt().item(), rel=1e-6)


def test_half_sum_of_squares_does_not_overflow():
    x = torch.full((1000,), 300.0, dtype=torch.float16)  # 300^2 * 1000 = 9e7 > 65504
    got = decoded(host_vector(x), 1000)
    assert got["rms"] == pytest.approx(300.0)
    assert got["nonfinite"] == 0


@pytest.mark.parametrize("size", [100, host_kernels.PARALLEL_FROM])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_flag_like_the_device_path(bad, size):
    x = torch.randn(size)
    x[37] = bad
    got = decoded(host_vector(x), size)
    device = decoded(moment_vector(x).double().numpy(), size)
    assert got["nonfinite"] == device["nonfinite"] == 1
    if math.isnan(bad):
        assert math.isnan(got["absmax"]) and math.isnan(device["absmax"])
    else:
        assert got["absmax"] == device["absmax"] == math.inf


def test_rows_keep_firing_order_across_both_paths(monkeypatch, tmp_path):
    """Entries reduced by the kernel, by torch's reductions and repeated ones come back in the
    order they were added (the mixed case: CPU tensors beside accelerator tensors)."""
    gen = torch.Generator().manual_seed(4)
    tensors = [torch.randn(n, generator=gen) * (i + 1) for i, n in enumerate((50, 7, 300))]
    rows = MomentRows()
    first = rows.add(tensors[0])  # kernel
    monkeypatch.setattr(host_kernels, "AVAILABLE", False)
    rows.add(tensors[1])  # torch reductions
    monkeypatch.setattr(host_kernels, "AVAILABLE", True)
    rows.add(tensors[2])  # kernel
    rows.repeat(first)
    seen = []
    collector = Collector()
    rows.hand_over(collector, lambda values, _: seen.append(values.copy()))
    assert collector.sync(Rows(writer=None)) == 1  # both parts in one host transfer (CPU)
    (values,) = seen
    order = [tensors[0], tensors[1], tensors[2], tensors[0]]
    numel = np.array([t.numel() for t in order])
    got = decode_moments(values, numel)
    assert got["rms"] == pytest.approx([t.double().pow(2).mean().sqrt().item() for t in order])
    assert got["absmax"] == pytest.approx([t.abs().max().item() for t in order])


def _child_moments(queue) -> None:
    # The tensor comes from numpy: a parallel torch op (torch.ones of this size) hangs in a
    # forked child of a process that ran OpenMP regions, with or without stabscope.
    ones = torch.from_numpy(np.ones(host_kernels.PARALLEL_FROM, np.float32))
    queue.put(host_vector(ones)[1])


def test_forked_child_of_a_threaded_parent_survives():
    """numba's OpenMP pool terminates a forked child that uses it again; the kernel keeps
    children to one thread, so a DataLoader or ddp_fork child of a recording process lives."""
    host_vector(torch.ones(host_kernels.PARALLEL_FROM))  # the parent starts its threads
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_moments, args=(queue,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == host_kernels.PARALLEL_FROM  # sum of squares of ones


@pytest.mark.slow
def test_environment_forces_the_torch_path():
    env = dict(os.environ, STABSCOPE_MOMENTS="torch")
    code = "from stabscope.probes.kernels import host_kernels as h; print(h.AVAILABLE)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False"


_KEEPS_THREADS = """
import sys, tempfile, torch
from torch import nn
import stabscope
torch.set_num_threads(int(sys.argv[1]))
model = nn.Sequential(nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 1))  # outputs (64, 4096)
opt = torch.optim.Adam(model.parameters())
with stabscope.Recorder(model, tempfile.mkdtemp() + "/run") as rec:
    for _ in range(2):
        loss = model(torch.randn(64, 64)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.step(loss=loss)
print(torch.get_num_threads())
"""


@pytest.mark.slow  # a child process per thread count: ~4.5 s each
@pytest.mark.parametrize("threads", [1, 2])
def test_recording_keeps_torchs_thread_count(threads):
    """Starting numba's OpenMP pool sets the OpenMP thread count of torch's runtime too (to
    NUMBA_NUM_THREADS, here 3): the model's own ops would then split differently and their
    results change bits. The recorder keeps torch's count as the user set it."""
    env = dict(os.environ, NUMBA_NUM_THREADS="3")
    run = [sys.executable, "-c", _KEEPS_THREADS, str(threads)]
    out = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(threads)


def test_kernels_that_fail_to_build_leave_torchs_reductions(monkeypatch, tmp_path):
    """A numba or LLVM version the kernels do not build on: one warning, then every CPU
    statistic comes from torch's reductions and still matches the plain formulas."""
    from stabscope.probes.kernels import moment_kernels

    def broken(*args):
        raise RuntimeError("LLVM refused the prefetch intrinsic")

    monkeypatch.setattr(host_kernels, "_built", [])
    monkeypatch.setattr(moment_kernels, "serial", broken)
    with pytest.warns(RuntimeWarning, match="numba kernels unavailable"):
        assert not host_kernels.ready()
    assert host_kernels.status() == "torch"
    x = torch.randn(1000) * 3
    rows = MomentRows()
    rows.add(x)
    seen = []
    collector = Collector()
    rows.hand_over(collector, lambda values, _: seen.append(values.copy()))
    collector.sync(Rows(writer=None))
    got = decoded(seen[0], x.numel())
    assert got["rms"] == pytest.approx(x.double().pow(2).mean().sqrt().item(), rel=1e-6)
    assert got["absmax"] == x.abs().max().item()
