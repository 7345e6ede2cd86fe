"""A small GPT with Pre-LN, Post-LN or DeepNorm blocks, on a synthetic next-token task.

The task: a vocabulary of ``vocab`` tokens where each token has ``successors`` possible next
tokens (fixed at random by ``task_seed``), chosen uniformly. A model that learns the table
reaches the optimal loss ln(successors) (0.69 for 2); a model that learns nothing stays near
ln(vocab) (3.47 for 32). The point of the sample: at depth 24 with no warm-up, Post-LN stays
stuck while its Pre-LN twin trains (numbers in docs/sample-models.md).

    stabscope profile sample_models/gpt.py --set norm=post --set depth=24
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CONFIG = {
    "norm": "pre",  # pre | post | deepnorm
    "depth": 24,
    "width": 64,
    "heads": 4,
    "seq_len": 32,
    "batch_size": 16,
    "vocab": 32,
    "successors": 2,
    "lr": 1e-3,
    "warmup": 0,  # linear warm-up steps; 0 = none
    "init": "xavier",  # xavier (Transformer/fairseq: xavier_uniform, zero bias) | torch (defaults)
    "attn": "sdpa",  # sdpa (F.scaled_dot_product_attention) | explicit (softmax written out)
    "qk_norm": False,  # LayerNorm on each head's queries and keys (Dehghani et al. 2023)
    "task_seed": 1234,
}


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, attn: str, qk_norm: bool = False) -> None:
        super().__init__()
        assert width % heads == 0, "width must be divisible by heads"
        self.heads, self.attn = heads, attn
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.o = nn.Linear(width, width)
        # QK-norm bounds each logit by the head width whatever the weights do: the
        # attention-logit growth of high learning rates cannot happen (Wortsman et al. 2023).
        self.q_norm = nn.LayerNorm(width // heads) if qk_norm else None
        self.k_norm = nn.LayerNorm(width // heads) if qk_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # (B, T, D) -> (B, H, T, D/H)
        q, k, v = (
            proj(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for proj in (self.q, self.k, self.v)
        )
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.attn == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            logits = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)  # (B, H, T, T)
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            y = logits.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """One residual block; ``norm`` decides where the LayerNorms sit.

    pre:      x + f(LN(x))          (Xiong et al. 2020: well-behaved gradients at init)
    post:     LN(x + f(x))          (Vaswani et al. 2017)
    deepnorm: LN(alpha*x + f(x))    (Wang et al. 2022, with beta-scaled init of v, o, fc, proj)
    """

    def __init__(
        self, width: int, heads: int, norm: str, alpha: float, attn: str, qk_norm: bool = False
    ) -> None:
        super().__init__()
        self.norm, self.alpha = norm, alpha
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, attn, qk_norm)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = MLP(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "pre":
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))
        x = self.ln1(self.alpha * x + self.attn(x))
        return self.ln2(self.alpha * x + self.mlp(x))


class GPT(nn.Module):
    def __init__(
        self,
        vocab: int,
        seq_len: int,
        width: int,
        depth: int,
        heads: int,
        norm: str,
        attn: str = "sdpa",
        init: str = "xavier",
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        if norm not in ("pre", "post", "deepnorm"):
            raise ValueError(f"norm must be pre, post or deepnorm, not {norm!r}")
        # DeepNet (Wang et al. 2022), decoder-only with N layers: alpha=(2N)^1/4, beta=(8N)^-1/4.
        alpha = (2 * depth) ** 0.25 if norm == "deepnorm" else 1.0
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(
            Block(width, heads, norm, alpha, attn, qk_norm) for _ in range(depth)
        )
        # Pre-LN needs a final norm: the residual stream's scale grows with depth.
        self.ln_f = nn.LayerNorm(width) if norm == "pre" else nn.Identity()
        self.head = nn.Linear(width, vocab)
        if init == "xavier":
            for lin in self.modules():
                if isinstance(lin, nn.Linear):
                    nn.init.xavier_uniform_(lin.weight)
                    nn.init.zeros_(lin.bias)
        elif init != "torch":
            raise ValueError(f"init must be xavier or torch, not {init!r}")
        if norm == "deepnorm":
            beta = (8 * depth) ** -0.25
            for block in self.blocks:
                for lin in (block.attn.q, block.attn.k):
                    nn.init.xavier_normal_(lin.weight, gain=1.0)
                for lin in (block.attn.v, block.attn.o, block.mlp.fc, block.mlp.proj):
                    nn.init.xavier_normal_(lin.weight, gain=beta)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        # idx: (B, T) token ids -> logits (B, T, vocab)
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def model(cfg) -> nn.Module:
    return GPT(
        cfg.vocab, cfg.seq_len, cfg.width, cfg.depth, cfg.heads, cfg.norm, cfg.attn, cfg.init,
        qk_norm=bool(cfg.get("qk_norm", False)),
    )  # fmt: skip


def successor_table(cfg) -> torch.Tensor:
    """(vocab, successors) table of allowed next tokens, fixed by task_seed."""
    g = torch.Generator().manual_seed(cfg.task_seed)
    return torch.stack(
        [torch.randperm(cfg.vocab, generator=g)[: cfg.successors] for _ in range(cfg.vocab)]
    )


def batches(cfg):
    """Endless (B, T+1) token sequences walking the successor table; seeded by torch's seed."""
    table = successor_table(cfg)
    g = torch.Generator().manual_seed(torch.initial_seed())
    while True:
        seq = torch.empty(cfg.batch_size, cfg.seq_len + 1, dtype=torch.long)
        seq[:, 0] = torch.randint(cfg.vocab, (cfg.batch_size,), generator=g)
        choice = torch.randint(cfg.successors, (cfg.batch_size, cfg.seq_len), generator=g)
        for t in range(cfg.seq_len):
            seq[:, t + 1] = table[seq[:, t], choice[:, t]]
        yield seq


def loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=cfg.lr)


def scheduler(opt: torch.optim.Optimizer, cfg):
    if cfg.warmup <= 0:
        return None
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup))
