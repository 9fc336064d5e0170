"""Tokenizer and datasets for a run: the built-in corpus, --data-path (blended), or --mock-data."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from megahet.config import MegahetConfig
from megahet.data.builder import build_datasets
from megahet.parallel.context import ParallelContext
from megahet.tokenizer import build_tokenizer, padded_vocab_size

log = logging.getLogger("megahet")


@dataclass
class DataSetup:
    tokenizer: Any
    vocab_size: int  # real vocabulary (tokenizer's)
    padded_vocab_size: int  # rounded up for TP; padded logits are masked
    train: Any
    valid: Optional[Any]
    test: Optional[Any]


def build_data(cfg: MegahetConfig, ctx: ParallelContext, train_iters: int) -> DataSetup:
    d, m, t = cfg.data, cfg.model, cfg.train
    data_path, tokenizer_model, tokenizer_type = d.data_path, d.tokenizer_model, d.tokenizer_type
    split_paths = None
    if d.train_data_path or d.valid_data_path or d.test_data_path:
        split_paths = (d.train_data_path, d.valid_data_path, d.test_data_path)
    if not d.mock_data and not data_path and split_paths is None:
        # No data given: the built-in corpus (stdlib documentation), built once and cached.
        from megahet.data.corpus import ensure_builtin_corpus
        if ctx.rank != 0:
            ctx.world_group.barrier()  # rank 0 builds it first
        builtin = ensure_builtin_corpus(d.data_cache_path, vocab_size=d.builtin_vocab_size)
        if ctx.rank == 0:
            ctx.world_group.barrier()
        data_path = [builtin.data_prefix]
        if tokenizer_model is None and tokenizer_type == "SentencePieceTokenizer":
            tokenizer_model = builtin.tokenizer_model
        log.info("using the built-in corpus %s", builtin.data_prefix)
    if d.mock_data:
        tokenizer_type = "NullTokenizer"
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model, m.vocab_size)
    vocab = tokenizer.vocab_size
    padded = padded_vocab_size(vocab, m.make_vocab_size_divisible_by, ctx.vocab_tp)  # every stage's TP divides it
    # Megatron's valid size (every evaluation of the run), so the valid samples are Megatron's too; each
    # evaluation here reads the first eval_iters batches. The test split is never read, so never built.
    eval_samples = (train_iters // t.eval_interval + 1) * t.eval_iters * t.global_batch_size if t.eval_interval else 0
    train, valid, test = build_datasets(data_path, d.split, m.seq_length, t.seed,
                                        (train_iters * t.global_batch_size, eval_samples, 0), tokenizer,
                                        mock=d.mock_data, cache_dir=d.data_cache_path, eod_mask_loss=d.eod_mask_loss,
                                        split_data_paths=split_paths)
    return DataSetup(tokenizer, vocab, padded, train, valid, test)
