"""A training script that compiles its model with ``torch.compile``, without stabscope.

    python train_compiled.py --backend eager --steps 4 [--graph-break] [--compile-loss]
        [--log FILE]

``--backend`` is any Dynamo backend (``eager`` and ``aot_eager`` need no C compiler);
``--graph-break`` puts one deliberate graph break in the forward pass, so that a test can
tell the script's own graph breaks from any a recorder would add; ``--compile-loss``
compiles the loss function too.
"""

from __future__ import annotations

import torch
from plain_loop import parser, regression_batch, regression_loop
from torch import nn

D_IN, HIDDEN, D_OUT, BATCH = 6, 12, 3, 8


class Net(nn.Module):
    def __init__(self, graph_break: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_IN, HIDDEN)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(HIDDEN, D_OUT)
        self.graph_break = graph_break

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D_IN) -> (B, D_OUT)
        h = self.act(self.fc1(x))
        if self.graph_break:
            torch._dynamo.graph_break()
        return self.fc2(h)


def make_model(graph_break: bool = False) -> Net:
    torch.manual_seed(0)
    return Net(graph_break)


def batch(step: int) -> tuple[torch.Tensor, ...]:
    return regression_batch(step, D_IN, D_OUT, BATCH)


def main() -> None:
    p = parser(__doc__, steps=4)
    p.add_argument("--backend", default="eager")
    p.add_argument("--graph-break", action="store_true")
    p.add_argument("--compile-loss", action="store_true")
    args = p.parse_args()
    model = make_model(args.graph_break)
    compiled = torch.compile(model, backend=args.backend)
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    mse = nn.functional.mse_loss
    if args.compile_loss:
        mse = torch.compile(mse, backend=args.backend)
    regression_loop(compiled, opt, batch, args.steps, args.log, mse)


if __name__ == "__main__":
    main()
