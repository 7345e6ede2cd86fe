"""A nanoGPT-style training script: the model computes its own loss.

    python train_lm_loss.py --steps 5 [--log FILE] [--save FILE]

``model(idx, targets)`` returns ``(logits, loss)`` as nanoGPT's GPT does; dropout is on, so
an extra forward that drew from the RNG would change every later step. ``--save`` writes the
final weights (``torch.save`` of the state dict).
"""

from __future__ import annotations

import torch
from plain_loop import log_step, parser
from torch import nn

VOCAB, WIDTH, HEADS, DEPTH, SEQ, BATCH = 16, 16, 2, 2, 6, 4


class GPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        layer = nn.TransformerEncoderLayer(
            WIDTH, HEADS, 4 * WIDTH, dropout=0.1, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, DEPTH, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T) tokens -> (B, T, VOCAB) logits, and the mean cross-entropy with targets."""
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1])
        logits = self.head(self.blocks(self.embed(idx), mask=mask, is_causal=True))
        if targets is None:
            return logits, None
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        return logits, loss


def make_model() -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = GPT()
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (B, T) and their next tokens (B, T)."""
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def train_step(model: GPT, opt: torch.optim.Optimizer, step: int) -> torch.Tensor:
    x, y = batch(step)
    _, loss = model(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def main() -> None:
    p = parser(__doc__, steps=5)
    p.add_argument("--save", default=None)
    args = p.parse_args()
    model, opt = make_model()
    for step in range(args.steps):
        loss = train_step(model, opt, step)
        log_step(args.log, step=step, loss=loss.item())
    if args.save:
        torch.save(model.state_dict(), args.save)


if __name__ == "__main__":
    main()
