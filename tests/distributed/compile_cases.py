"""Rank function: a few training steps of a tiny GPT, eager or with compiled layers (aot_eager)."""
import torch

from megahet.compile import compile_layers
from megahet.config import build_config
from megahet.parallel.context import build_parallel_context
from megahet.training.loss_scaler import build_loss_scaler
from megahet.training.model_builder import build_model_chunks
from megahet.training.optimizer_setup import build_optimizer
from megahet.training.train_step import train_step

VOCAB = 64


def compiled_losses(compiled: bool, tp: int, over: dict):
    cfg = build_config(overrides=dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=8,
                                      vocab_size=VOCAB, make_vocab_size_divisible_by=1, mock_data=True,
                                      train_iters=1, micro_batch_size=2, global_batch_size=2, lr=1e-2,
                                      tensor_model_parallel_size=tp, **over))
    ctx = build_parallel_context(tp=tp, backend_name="cpu", timeout_s=120)
    chunks = build_model_chunks(cfg, ctx, VOCAB, VOCAB)
    if compiled:
        compile_layers(chunks, ctx.device, backend="aot_eager")
    scaler = build_loss_scaler(False)
    ddp, opt = build_optimizer(cfg, ctx, chunks, scaler)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(2):
        t = torch.randint(0, VOCAB, (2, 9), generator=g)
        mb = {"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(2, 8)}
        out.append(train_step(chunks, ddp, opt, ctx, [mb], schedule="afab", loss_scaler=scaler).loss)
    return out
