"""One tensor's moments: the single-pass numba kernel against torch's reductions, on CPU.

    python bench/moments.py              # torch's default threads
    python bench/moments.py --threads 1

For each size, the median time of ``host_moments_into`` (sum, sum of squares and absmax in one
pass) against ``moment_scalars`` (``sum``, ``dot`` and ``amin``/``amax`` or ``aminmax``), both
on the same float32 tensor, hot in cache: this is the kernels' own speed. Inside a training
step the tensors come from memory and both are slower; ``bench/overhead.py`` measures that.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from stabscope.probes import host_kernels, host_moments
from stabscope.probes.moments import moment_scalars


def median_us(fn, repeats: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


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


if __name__ == "__main__":
    main()
