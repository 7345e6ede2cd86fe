"""The CPU kernels against the torch passes they replace, outside a training step.

    python bench/moments.py              # torch's default threads
    python bench/moments.py --threads 1

Four tables:
  hot          one tensor's moments, ``host_moments_into`` (sum, sum of squares and absmax in
               one pass) against ``moment_scalars`` (``sum``, ``dot``, ``amin``/``amax`` or
               ``aminmax``), on the same float32 tensor, hot in cache: the kernels' own speed;
  from memory  the same on a 256 MiB tensor from torch's allocator (4 KiB pages, no huge
               pages), in GB/s: the regime of a training step's tensors;
  parameters   the parameter probe's passes over the sample GPT's parameters (6 layers,
               d=256; 102 tensors, 4.9M values), caches flushed before each: weight and gradient
               norms plus the pre-step copy, and the update norm after the step;
  probes       one call of the structure probes' kernels on the sample GPT's shapes, hot, each
               against the torch path it replaces (numba switched off in the same process): a
               residual branch's statistics (batch 8 x 128 tokens x 256) and the attention
               sample of one SDPA call (2 of 8 sequences, 16 of 128 queries, 4 heads of 64, q
               and k transposed views of (B, T, H, E) projections, causal).
``bench/overhead.py`` measures what all of it adds to a real step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from stabscope.drivers.script import ScriptConfig
from stabscope.probes.attention import AttentionSampling, sdpa_sample
from stabscope.probes.kernels import host_kernels, host_moments
from stabscope.probes.kernels.host_params import difference_squares, squares_and_copy
from stabscope.probes.moments import moment_scalars
from stabscope.probes.residual import branch_stats


def median_us(fn, repeats: int, before=None) -> float:
    """Median µs of ``fn()``; ``before()`` runs untimed ahead of each call."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def from_memory(out: np.ndarray) -> None:
    x = torch.randn(1 << 26)  # 256 MiB: far beyond every cache
    gb = x.numel() * 4 / 1e9
    reference = median_us(lambda: torch.stack(moment_scalars(x)), 5) / 1e6
    kernel = median_us(lambda: host_moments.host_moments_into(x, out), 5) / 1e6
    print("\n| 256 MiB from memory | torch reductions | numba, one pass | speed-up |")
    print("|---|---|---|---|")
    print(f"| GB/s | {gb / reference:.1f} | {gb / kernel:.1f} | {reference / kernel:.2f}x |")


def parameter_passes(repeats: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sample_models"))
    import gpt

    cfg = ScriptConfig(gpt.CONFIG | dict(depth=6, width=256, vocab=256))
    weights = [p.detach() for p in gpt.model(cfg).parameters()]
    grads = [torch.randn_like(w) for w in weights]
    copies = [torch.empty_like(w) for w in weights]
    flush = torch.empty(1 << 24)  # 64 MiB written between calls: every pass starts cold

    def torch_before() -> None:
        torch.stack([torch.dot(t.view(-1), t.view(-1)) for t in weights + grads])
        torch._foreach_copy_(copies, weights)

    def torch_after() -> None:
        torch._foreach_sub_(copies, weights)
        torch.stack([torch.dot(t.view(-1), t.view(-1)) for t in copies])

    rows = [
        ("norms + pre-step copy", torch_before, lambda: squares_and_copy(weights, grads, copies)),
        ("update norm", torch_after, lambda: difference_squares(weights, copies)),
    ]
    print("\n| parameter pass (cold) | torch | numba, one call | speed-up |")
    print("|---|---|---|---|")
    for name, reference_fn, kernel_fn in rows:
        reference = median_us(reference_fn, repeats, flush.zero_) / 1e3
        kernel = median_us(kernel_fn, repeats, flush.zero_) / 1e3
        print(f"| {name} | {reference:.2f} ms | {kernel:.2f} ms | {reference / kernel:.2f}x |")


def probe_calls(repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    x, f = torch.randn(8, 128, 256, generator=g), torch.randn(8, 128, 256, generator=g)
    q, k = (torch.randn(8, 128, 4, 64, generator=g).transpose(1, 2) for _ in range(2))
    sampling = AttentionSampling()
    rows = [
        ("residual branch statistics", lambda: branch_stats(x, f, 1.0)),
        ("attention sample (SDPA, causal)", lambda: sdpa_sample(q, k, None, True, None, sampling)),
    ]
    print("\n| probe call (hot) | torch path | numba | speed-up |")
    print("|---|---|---|---|")
    for name, fn in rows:
        kernel = median_us(fn, repeats)
        host_kernels.AVAILABLE = False  # the torch path, in the same process
        try:
            reference = median_us(fn, repeats)
        finally:
            host_kernels.AVAILABLE = True
        print(f"| {name} | {reference:.1f} µs | {kernel:.1f} µs | {reference / kernel:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args()
    if not host_kernels.ready():
        raise SystemExit("numba is not installed (pip install 'stabscope[fast]')")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# CPU moments, float32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| elements | torch reductions | numba, one pass | speed-up |")
    print("|---|---|---|---|")
    out = np.empty(4)
    for size in (1 << 12, 1 << 16, 1 << 18, 1 << 20, 1 << 22):
        x = torch.randn(size)
        reference = median_us(lambda x=x: torch.stack(moment_scalars(x)), args.repeats)
        kernel = median_us(lambda x=x: host_moments.host_moments_into(x, out), args.repeats)
        print(f"| {size:,} | {reference:.1f} µs | {kernel:.1f} µs | {reference / kernel:.2f}x |")
    from_memory(out)
    parameter_passes(max(10, args.repeats // 10))
    probe_calls(args.repeats)


if __name__ == "__main__":
    main()
