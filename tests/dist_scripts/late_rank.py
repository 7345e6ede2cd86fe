"""Two ranks whose process group's store lives in rank 0's own process (``env://``, no
torchrun agent), with a run directory that already holds a run: rank 0 is refused and ends
at once; rank 1 creates its Recorder ``--delay`` seconds later and must get rank 0's error,
not a network error from a store that is gone. Prints one line per rank."""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist

import stabscope


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--delay", type=float, default=1.5)
    args = parser.parse_args()
    dist.init_process_group("gloo", init_method="env://")
    rank = dist.get_rank()
    if rank == 1:
        time.sleep(args.delay)
    try:
        stabscope.Recorder(torch.nn.Linear(2, 2), args.out)
    except Exception as err:  # the refusal, or whatever a lost store raises
        sys.stdout.write(f"rank {rank}: {type(err).__name__}: {err}\n")
        sys.stdout.flush()
        sys.exit(3)


if __name__ == "__main__":
    main()
