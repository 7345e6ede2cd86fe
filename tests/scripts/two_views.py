"""A contrastive training script: two views of a batch through the same encoder, the InfoNCE
loss between them computed in the loop (the second call's torch calls are part of the loss).
``--dropout P`` drops features of the second view in the loop: a random loss.

    python two_views.py --steps 4 [--dropout P] [--log FILE]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from plain_loop import loss_loop, parser
from torch import nn


def main() -> None:
    p = parser(__doc__, steps=4)
    p.add_argument("--dropout", type=float, default=0.0)
    args = p.parse_args()
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    opt = torch.optim.Adam(encoder.parameters(), lr=1e-3)

    def info_nce(step: int) -> torch.Tensor:
        x = torch.randn(16, 8)
        z1 = F.normalize(encoder(x), dim=-1)  # (16, 8)
        z2 = encoder(x + 0.1 * torch.randn_like(x))
        z2 = F.normalize(F.dropout(z2, args.dropout) if args.dropout else z2, dim=-1)
        return F.cross_entropy(z1 @ z2.T / 0.1, torch.arange(16))  # (16, 16) similarities

    loss_loop(opt, info_nce, args.steps, args.log)


if __name__ == "__main__":
    main()
