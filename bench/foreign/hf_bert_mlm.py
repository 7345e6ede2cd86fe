"""HF BERT masked LM (tiny config) on a random successor-table walk (vocab 32, each token
2 successors). fail=1: Adam lr 3e-2 (Post-LN BERT, no warm-up)."""

import common
import torch
from transformers import BertConfig, BertForMaskedLM

torch.set_num_threads(1)
CONFIG = {"fail": 0, "lr": 1e-3, "fail_lr": 3e-2, "layers": 4}
_log = None
MASK = 128


def model(cfg):
    global _log
    _log = common.LossLog(f"hf_bert_mlm-{'fail' if cfg.fail else 'ok'}")
    c = BertConfig(
        vocab_size=130,
        hidden_size=64,
        num_hidden_layers=cfg.layers,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForMaskedLM(c)


def batches(cfg):
    g = torch.Generator().manual_seed(0)
    table = common.successor_table(32)
    while True:
        x = common.successor_walk(g, table, 32, 64)
        m = torch.rand(x.shape, generator=g) < 0.15  # 15% of the tokens masked and predicted
        labels = torch.where(m, x, torch.full_like(x, -100))
        yield {"input_ids": torch.where(m, torch.full_like(x, MASK), x), "labels": labels}


def loss(model, batch):
    value = model(**batch).loss
    _log(value)
    return value


def optimizer(model, cfg):
    return torch.optim.Adam(model.parameters(), lr=cfg.fail_lr if cfg.fail else cfg.lr)
