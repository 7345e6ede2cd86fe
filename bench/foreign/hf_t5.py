"""HF T5 from a tiny config, sequence reversal task (vocab 32, len 12). fail=1: Adam lr 0.5."""

import common
import torch
from transformers import T5Config, T5ForConditionalGeneration

torch.set_num_threads(1)
CONFIG = {"fail": 0, "lr": 3e-3, "fail_lr": 0.5}
_log = None
V, L = 32, 12  # tokens 2..33 (0 pad / decoder start, 1 eos), sequence length


def model(cfg):
    global _log
    _log = common.LossLog(f"hf_t5-{'fail' if cfg.fail else 'ok'}")
    c = T5Config(
        vocab_size=V + 2,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(c)


def batches(cfg):
    g = torch.Generator().manual_seed(0)
    while True:
        x = torch.randint(2, V + 2, (32, L), generator=g)
        yield {"input_ids": x, "labels": x.flip(1)}


def loss(model, batch):
    value = model(**batch).loss
    _log(value)
    return value


def optimizer(model, cfg):
    return torch.optim.Adam(model.parameters(), lr=cfg.fail_lr if cfg.fail else cfg.lr)
