"""What one exact read of a block output costs inside a training step, by method.

The every-step tier reads each watched module's output and the gradient w.r.t. it once per
step (sum of squares, absmax, NaN/Inf: bench/flight_share.py). This bench times that read
inside real forward hooks and gradient hooks of the sample GPT's blocks, with the method
changing from one step to the next in one process, so every method sees the same machine
state:

    kernel     the ring's one-pass numba kernel (``host_moments.accumulate_into``), on the
               hook's thread
    again      the same kernel, then timed a second time on the same tensor: a read from
               the caches, the floor of any method that reads the tensor once
    torch      torch's own reductions on its intra-op threads: ``dot`` (sum of squares)
               then ``aminmax`` (the extremes), two passes

    python bench/hook_reads.py [--steps 60] [shape options of bench/sample_gpt.py]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch
from sample_gpt import add_shape_args, gpt, sample_gpt

from stabscope.probes.kernels import host_kernels, host_moments


def _kernel(t: torch.Tensor, cell: np.ndarray) -> float:
    t0 = time.perf_counter()
    host_moments.accumulate_into(t, cell)
    return time.perf_counter() - t0


def _again(t: torch.Tensor, cell: np.ndarray) -> float:
    host_moments.accumulate_into(t, cell)
    return _kernel(t, cell)


def _torch(t: torch.Tensor, cell: np.ndarray) -> float:
    t0 = time.perf_counter()
    x = t.reshape(-1)  # (numel,)
    torch.dot(x, x)
    torch.aminmax(x)
    return time.perf_counter() - t0


METHODS: dict[str, Callable[[torch.Tensor, np.ndarray], float]] = {
    "kernel": _kernel,
    "again": _again,
    "torch": _torch,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add_shape_args(ap)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    if not host_kernels.ready():
        raise SystemExit("numba is not installed: pip install -e '.[fast]'")
    model, batches = sample_gpt(args, torch.device("cpu"), 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    cell = np.zeros(5, np.float32)  # [sum, sumsq, min, max, numel], as a ring cell
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    method: list[str | None] = [None]  # None: a warm-up step, nothing read

    def on_grad(g: torch.Tensor) -> None:
        if method[0] is not None:
            times[(method[0], "gradient")].append(METHODS[method[0]](g, cell))

    def on_output(module: torch.nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        if method[0] is not None:
            times[(method[0], "output")].append(METHODS[method[0]](out.detach(), cell))
            out.register_hook(on_grad)

    for block in model.blocks:
        block.register_forward_hook(on_output)
    names = list(METHODS)
    for method_ in names:  # compile and warm each method up
        METHODS[method_](batches[0].float(), cell)
    for i in range(args.steps + 2):
        method[0] = names[i % len(names)] if i >= 2 else None
        loss = gpt.loss(model, batches[i % len(batches)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    numel = model.blocks[0].ln1.weight.numel() * args.seq_len * args.batch_size
    print(f"one read of a block output ({numel * 4 / 2**20:.2g} MiB), median over the steps:")
    for name in names:
        out, grad = (statistics.median(times[(name, d)]) * 1e6 for d in ("output", "gradient"))
        print(f"  {name:7s} output {out:.0f} µs, gradient {grad:.0f} µs")


if __name__ == "__main__":
    main()
