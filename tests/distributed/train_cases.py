"""Rank functions that run the real pretraining loop on tiny models."""
import json

from megahet.config import build_config
from megahet.training.pretrain import pretrain

TINY = dict(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, seq_length=16,
            mock_data=True, vocab_size=128, make_vocab_size_divisible_by=8, micro_batch_size=2,
            global_batch_size=8, lr=3e-3, min_lr=3e-4, lr_warmup_iters=2, log_interval=1, eval_interval=0,
            seed=11, distributed_timeout_s=60)


def train(over: dict):
    """Run pretrain(); return the per-iteration metrics records (rank 0) or None."""
    cfg = build_config(overrides={**TINY, **over})
    pretrain(cfg)
    path = cfg.logging.metrics_file
    if path is None:
        return None
    try:
        with open(path) as fh:
            return [json.loads(line) for line in fh]
    except FileNotFoundError:
        return None


def losses(records):
    return [r["loss"] for r in records if "loss" in r]
