"""Plain training script: a GAN on a ring of 8 Gaussians in 2-D (two models, two Adam
optimizers). Quality q = mean distance of generated points to the nearest mode centre
(lower is better; real data ~0.05), logged next to the loss.
--lr 1e-3 (default, healthy, non-monotone losses); --lr 0.5 --beta1 0.9 (fails: D/G blow up)."""

import argparse
import math

import common
import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta1", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--name", default="gan")
    a = p.parse_args()
    torch.manual_seed(0)
    ang = torch.arange(8) * (2 * math.pi / 8)
    centres = torch.stack([ang.cos(), ang.sin()], 1) * 2
    G = nn.Sequential(
        nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 2)
    )
    D = nn.Sequential(
        nn.Linear(2, 128), nn.LeakyReLU(0.2), nn.Linear(128, 128), nn.LeakyReLU(0.2),
        nn.Linear(128, 1),
    )  # fmt: skip
    og = torch.optim.Adam(G.parameters(), lr=a.lr, betas=(a.beta1, 0.999))
    od = torch.optim.Adam(D.parameters(), lr=a.lr, betas=(a.beta1, 0.999))
    log = common.LossLog(a.name)
    ones, zeros = torch.ones(128, 1), torch.zeros(128, 1)
    for step in range(a.steps):
        real = centres[torch.randint(8, (128,))] + 0.05 * torch.randn(128, 2)
        z = torch.randn(128, 8)
        fake = G(z)
        d_real = F.binary_cross_entropy_with_logits(D(real), ones)
        d_loss = d_real + F.binary_cross_entropy_with_logits(D(fake.detach()), zeros)
        od.zero_grad()
        d_loss.backward()
        od.step()
        g_loss = F.binary_cross_entropy_with_logits(D(fake), ones)
        og.zero_grad()
        g_loss.backward()
        og.step()
        with torch.no_grad():
            q = torch.cdist(G(torch.randn(512, 8)), centres).min(1).values.mean()
        log(g_loss + d_loss, q=q, d=d_loss, g=g_loss)
        if step % 50 == 0:
            print(f"step {step} d {d_loss.item():.3f} g {g_loss.item():.3f} q {q.item():.3f}")


if __name__ == "__main__":
    main()
