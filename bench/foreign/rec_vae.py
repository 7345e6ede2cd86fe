"""Recorder API: a VAE on 32-dim data from a 4-dim latent (nonlinear).
argv[1]: ok | fail (SGD lr 2.0: exp(logvar) overflows -> Inf/NaN). The run directory is
FOREIGN_RUN_DIR (set by bench/foreign/run.py), else runs/vae-VARIANT."""

import sys

import common
import torch
import torch.nn.functional as F
from torch import nn

import stabscope

torch.set_num_threads(1)


class VAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 8))
        self.dec = nn.Sequential(nn.Linear(4, 128), nn.ReLU(), nn.Linear(128, 32))

    def forward(self, x):
        mu, logvar = self.enc(x).chunk(2, -1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        rec = self.dec(z)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1).mean()
        return F.mse_loss(rec, x, reduction="none").sum(-1).mean() + kl


def main() -> None:
    variant = sys.argv[1]
    torch.manual_seed(0)
    mix = torch.randn(4, 32)  # the data: tanh of a random 4 -> 32 linear map of N(0, 1)
    m = VAE()
    if variant == "ok":
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(m.parameters(), lr=2.0)
    log = common.LossLog(f"rec_vae-{variant}")
    out = common.run_dir(f"runs/vae-{variant}")
    with stabscope.Recorder(m, out=out, force=True) as rec:
        for _ in range(300):
            x = torch.tanh(torch.randn(128, 4) @ mix)
            loss = m(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            log(loss)
            rec.step(loss=loss)
    print("done")


if __name__ == "__main__":
    main()
