"""A plain training script, written as people write them: argparse, a loop, no stabscope.

An MLP with in-place ReLUs on 3-D inputs (batch, tokens, features) learns to imitate a frozen
random "teacher" network. The teacher is called first in every step and has parameters, but
no optimizer trains it; the loss is a separate ``nn.MSELoss`` module. Flags add gradient
accumulation, eval passes, AMP's GradScaler, a second optimizer, and the ways a script can
end badly. ``--log FILE`` appends one JSON line per optimizer step with the step's loss (the
sum of the scalars ``backward`` was called on), so tests can compare.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn

D_IN, HIDDEN, D_OUT, TOKENS, BATCH = 8, 16, 4, 5, 6


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_IN, HIDDEN)
        self.act1 = nn.ReLU(inplace=True)  # modifies fc1's 3-D output (a view) in place
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.act2 = nn.ReLU(inplace=True)
        self.head = nn.Linear(HIDDEN, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D_IN) -> (B, T, D_OUT)
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x)))))


def make_model(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    model, teacher = Net(), nn.Linear(D_IN, D_OUT)
    teacher.requires_grad_(False)
    return model, teacher


def batch(step: int, micro: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randn(BATCH, TOKENS, D_IN, generator=g)


def make_optimizers(model: Net, lr: float, two: bool) -> list[torch.optim.Optimizer]:
    if not two:
        return [torch.optim.Adam(model.parameters(), lr=lr)]
    body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    return [
        torch.optim.Adam(body, lr=lr),
        torch.optim.SGD(model.head.parameters(), lr=10 * lr),
    ]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--inference-mode", action="store_true", help="eval under inference_mode")
    p.add_argument("--amp", action="store_true", help="GradScaler-scaled backward")
    p.add_argument("--overflow-steps", type=int, default=0, help="an Inf gradient in these")
    p.add_argument("--two-optimizers", action="store_true", help="SGD for the head")
    p.add_argument("--raise-at", type=int, default=-1)
    p.add_argument("--exit-at", type=int, default=-1)
    p.add_argument("--exit-code", type=int, default=0)
    p.add_argument("--no-step", action="store_true", help="never call optimizer.step()")
    p.add_argument("--log", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    model, teacher = make_model()
    criterion = nn.MSELoss()
    optimizers = make_optimizers(model, args.lr, args.two_optimizers)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=args.amp)
    for step in range(args.steps):
        if step == args.raise_at:
            raise RuntimeError(f"data loader broke at step {step}")
        if step == args.exit_at:
            sys.exit(args.exit_code)
        for opt in optimizers:
            opt.zero_grad()
        step_loss = 0.0
        for micro in range(args.accum):
            x = batch(step, micro)
            target = teacher(x)
            loss = criterion(model(x), target) / args.accum
            scaler.scale(loss).backward()
            step_loss += loss.item()
        if step < args.overflow_steps:  # as an fp16 overflow leaves it: the scaler skips
            next(model.parameters()).grad[0] = float("inf")
        scale = scaler.get_scale()
        if not args.no_step:
            for opt in optimizers:
                scaler.step(opt)
            scaler.update()
        skipped = args.amp and scaler.get_scale() < scale  # Inf/NaN: the scaler skipped it
        if args.eval_every and step % args.eval_every == 0:
            model.eval()
            with torch.inference_mode() if args.inference_mode else torch.no_grad():
                model(batch(step, 99))
            model.train()
        if args.log:
            with open(args.log, "a") as f:
                f.write(json.dumps({"step": step, "loss": step_loss, "skipped": skipped}) + "\n")


if __name__ == "__main__":
    main()
