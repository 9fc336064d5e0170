"""Check the cost model's parameter counts against the real model, built for one rank on `meta`.

The model of a chosen rank (its TP / EP shard, its pipeline stage's layers, embedding or head) is
built exactly as training builds it, with a one-process context whose TP and EP groups have the
plan's sizes (no communication happens while building), on the meta device so nothing is allocated.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterator, List, Sequence, Tuple

import torch

from megahet.hetero import cost_model as cm


def rank_model_params(cfg, layer_ids: Sequence[int], tp: int, tp_rank: int, ep: int, ep_rank: int, first: bool,
                      last: bool, pp: int, vocab_size: int) -> cm.ParamCount:
    """Elements of the chunk one rank builds (dense / expert / fp32 as the cost model splits them)."""
    from megahet.models.gpt import GPTModel
    from megahet.parallel.comm import CommGroup
    from megahet.parallel.context import single_process_context
    from megahet.tokenizer import padded_vocab_size

    base = single_process_context("cpu")
    meta = torch.device("meta")
    ctx = replace(base, device=meta, tp=tp, pp=pp, dp=ep, ep=ep, tp_rank=tp_rank, ep_rank=ep_rank,
                  pp_rank=0 if first else pp - 1,
                  tp_group=CommGroup(list(range(tp)), tp_rank, name="tp"),
                  ep_group=CommGroup(list(range(ep)), ep_rank, name="ep"))
    padded = padded_vocab_size(vocab_size, cfg.model.make_vocab_size_divisible_by, tp)
    dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
    model = GPTModel(cfg.model, ctx, layer_ids=list(layer_ids), pre_process=first, post_process=last,
                     vocab_size=vocab_size, padded_vocab_size=padded, dtype=dtype)
    out = cm.ParamCount()
    for p in model.parameters():
        n = p.numel()
        if getattr(p, "is_expert", False) or ".experts." in getattr(p, "global_name", ""):
            out.expert += n
        elif p.dtype == torch.float32 and dtype != torch.float32:
            out.fp32 += n
        else:
            out.dense += n
    return out


def _cases() -> Iterator[Tuple[str, object, List[int], int, int, int, int, bool, bool, int]]:
    from megahet.config import build_config
    dense = build_config(overrides=dict(num_layers=6, hidden_size=256, num_attention_heads=8, num_query_groups=4,
                                        seq_length=128, vocab_size=1000, bf16=True), validate=False)
    gpt2 = build_config(overrides=dict(num_layers=4, hidden_size=192, num_attention_heads=6, seq_length=64,
                                       vocab_size=777, normalization="LayerNorm", swiglu=False,
                                       disable_bias_linear=False, position_embedding_type="learned_absolute",
                                       untie_embeddings_and_output_weights=True), validate=False)
    moe = build_config(overrides=dict(num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                                      seq_length=64, vocab_size=500, num_experts=8, moe_router_topk=2,
                                      moe_ffn_hidden_size=96, moe_shared_expert_intermediate_size=64,
                                      moe_layer_freq=2, bf16=True), validate=False)
    yield "dense GQA SwiGLU bf16, TP2, first of 2 stages", dense, [0, 1, 2], 2, 1, 1, 0, True, False, 2
    yield "dense GQA SwiGLU bf16, TP2, last of 2 stages", dense, [3, 4, 5], 2, 1, 1, 0, False, True, 2
    yield "GPT-2 style (LayerNorm, biases, learned pos), TP3, one stage", gpt2, [0, 1, 2, 3], 3, 2, 1, 0, True, True, 1
    yield "MoE every 2nd layer, shared expert, TP2 EP4, middle", moe, [1, 2], 2, 1, 4, 3, False, False, 3
    yield "MoE every 2nd layer, shared expert, TP1 EP2, last", moe, [2, 3], 1, 0, 2, 1, False, True, 2


def compare_cases() -> List[Tuple[str, str, int, int]]:
    """(case, rank, elements in the built model, elements the cost model predicts) per case."""
    out = []
    for name, cfg, layers, tp, tp_rank, ep, ep_rank, first, last, pp in _cases():
        vocab = cfg.model.vocab_size
        real = rank_model_params(cfg, layers, tp, tp_rank, ep, ep_rank, first, last, pp, vocab)
        spec = cm.ModelSpec.from_config(cfg, vocab)
        predicted = cm.stage_params(spec, layers, tp, ep, first, last, pp)
        rank = f"tp {tp_rank}/{tp} ep {ep_rank}/{ep} layers {layers[0]}-{layers[-1]}"
        out.append((name, rank, real.total, predicted.total))
    return out
