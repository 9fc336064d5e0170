"""`load_model`: any checkpoint, whatever layout saved it, as one single-process model."""
from __future__ import annotations

import torch

from megahet.config import config_from_dict
from megahet.errors import MegahetError
from megahet.models.gpt import GPTModel
from megahet.parallel.context import single_process_context
from megahet.tokenizer import padded_vocab_size
from megahet.training import checkpoint as ckpt
from megahet.training.model_builder import build_moe_tracker


class LoadedModel(torch.nn.Module):
    """A GPT model for evaluation: `model(tokens [b, s]) -> logits [b, s, vocab]`."""

    def __init__(self, model: GPTModel, config, dtype: torch.dtype):
        super().__init__()
        self.model, self.config, self.dtype = model, config, dtype

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.model(tokens=tokens.to(self.model.ctx.device))
        return logits if self.dtype == torch.float32 else logits.to(self.dtype)


def load_model(checkpoint_dir: str, backend: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load the latest checkpoint under `checkpoint_dir` (or that checkpoint itself) in one process.

    Args:
        backend: where to run (default cpu); the checkpoint's own layout does not matter.
        dtype: dtype of the weights and returned logits (fp32 unless asked otherwise).
    """
    path = ckpt.find_checkpoint(checkpoint_dir)
    if path is None:
        raise MegahetError(f"no checkpoint found under {checkpoint_dir}; pass a directory written by --save")
    ctx = single_process_context(backend)
    problem = ckpt.verify_checkpoint(path, ctx)
    if problem:
        raise MegahetError(problem)
    meta = ckpt.read_meta(path)
    cfg = config_from_dict(meta["config"])
    cfg.parallel.tensor_model_parallel_size = cfg.parallel.pipeline_model_parallel_size = 1
    cfg.parallel.expert_model_parallel_size = 1
    vocab = int(meta["vocab_size"])
    padded = padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by, 1)
    model = GPTModel(cfg.model, ctx, layer_ids=range(cfg.model.num_layers), pre_process=True, post_process=True,
                     vocab_size=vocab, padded_vocab_size=padded, seed=cfg.train.seed, dtype=dtype,
                     moe_tracker=build_moe_tracker(cfg))
    ckpt.load_checkpoint_at(path, meta, [model], None, ctx, vocab_size=vocab)
    model.eval()
    return LoadedModel(model, cfg, dtype)
