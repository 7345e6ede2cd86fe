"""Plain training script: MLP classifier, 10 classes, with label noise.
--noise 0.6 (default): 60% of labels random (the loss stays high, but falls; clean accuracy
rises: healthy). --bug-no-step: optimizer.step() is never called (the model stands still).
--bug-zero-before-step: zero_grad() between backward() and step() (stands still)."""

import argparse

import common
import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--noise", type=float, default=0.6)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--bug-no-step", action="store_true")
    p.add_argument("--bug-zero-before-step", action="store_true")
    p.add_argument("--name", default="labelnoise")
    a = p.parse_args()
    torch.manual_seed(0)
    w = torch.randn(32, 10, generator=torch.Generator().manual_seed(1234))
    m = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    log = common.LossLog(a.name)
    for step in range(a.steps):
        x = torch.randn(64, 32)
        y = (x @ w).argmax(1)
        noisy = torch.where(torch.rand(64) < a.noise, torch.randint(10, (64,)), y)
        out = m(x)
        loss = F.cross_entropy(out, noisy)
        opt.zero_grad()
        loss.backward()
        if a.bug_zero_before_step:
            opt.zero_grad()  # bug: gradients cleared before the update
        if not a.bug_no_step:
            opt.step()
        acc = (out.argmax(1) == y).float().mean()
        log(loss, acc=acc)
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} clean acc {acc.item():.3f}")


if __name__ == "__main__":
    main()
