"""Plain training script: GRU char LM with gradient accumulation (4 micro-batches per step),
SGD momentum. --bug-no-zero: zero_grad() is never called, so gradients accumulate across
steps (the loss climbs back)."""

import argparse

import common
import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)


class GRULM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(128, 48)
        self.gru = nn.GRU(48, 128, batch_first=True)
        self.head = nn.Linear(128, 128)

    def forward(self, x):
        return self.head(self.gru(self.emb(x))[0])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bug-no-zero", action="store_true")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--name", default="accum")
    a = p.parse_args()
    torch.manual_seed(0)
    data = common.text_bytes()
    m = GRULM()
    opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)
    log = common.LossLog(a.name)
    for step in range(a.steps):
        tot = 0.0
        for _ in range(4):
            ix = torch.randint(len(data) - 33, (16,))
            b = torch.stack([data[i : i + 33] for i in ix])
            logits = m(b[:, :-1]).reshape(-1, 128)
            loss = F.cross_entropy(logits, b[:, 1:].reshape(-1)) / 4
            loss.backward()
            tot += loss.item()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        if not a.bug_no_zero:
            opt.zero_grad()
        log(tot)
        if step % 30 == 0:
            print(f"step {step} loss {tot:.3f}")


if __name__ == "__main__":
    main()
