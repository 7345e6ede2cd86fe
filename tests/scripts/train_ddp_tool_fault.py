"""train_ddp.py with a fault of stabscope's own injected on one rank, for the tests: under
``torchrun ... -m stabscope profile train_ddp_tool_fault.py -- --fault-rank R --fault-at S``
rank R's step boundary raises at step S (stabscope's code, not the script's), as a bug in
stabscope on that rank alone would. The training itself is train_ddp.py's, untouched.
"""

from __future__ import annotations

import argparse
import os
import sys

from stabscope.record import recorder
from tests.scripts import train_ddp


def inject(rank: int, at: int) -> None:
    every_boundary = recorder.Recorder._every_boundary

    def faulty(self: recorder.Recorder, step: int) -> None:
        if step == at:
            raise RuntimeError(f"injected fault on rank {rank}")
        every_boundary(self, step)

    if int(os.environ.get("RANK", "0")) == rank:
        recorder.Recorder._every_boundary = faulty  # type: ignore[method-assign]


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--fault-rank", type=int, required=True)
    p.add_argument("--fault-at", type=int, required=True)
    ours, rest = p.parse_known_args()
    inject(ours.fault_rank, ours.fault_at)
    sys.argv = [sys.argv[0], *rest]  # train_ddp.py's own arguments
    train_ddp.main()
