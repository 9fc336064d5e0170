"""Rank functions for the tensor-parallel equivalence tests (importable by spawned ranks)."""
import torch

from megahet.config import build_config
from megahet.models.gpt import GPTModel
from megahet.parallel.context import build_parallel_context
from megahet.parallel.grad_sync import allreduce_sequence_parallel_grads
from megahet.parallel.sharding import gather_full

VOCAB = 100


def small_config(**over):
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=4, seq_length=16,
                vocab_size=VOCAB, tokenizer_type="NullTokenizer", mock_data=True, train_iters=1,
                make_vocab_size_divisible_by=8)
    base.update(over)
    return build_config(overrides=base)


def batch(cfg, b=3, seed=7):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (b, cfg.model.seq_length + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def run_tp(tp, sp, over=None):
    """Forward + backward on `tp` ranks; rank 0 returns loss, logits and full gradients by name."""
    cfg = small_config(tensor_model_parallel_size=tp, sequence_parallel=sp, **(over or {}))
    ctx = build_parallel_context(tp=tp, backend_name="cpu", timeout_s=60)
    padded = -(-VOCAB // (8 * tp)) * 8 * tp  # padding grows with tp: the loss must not notice
    model = GPTModel(cfg.model, ctx, layer_ids=range(cfg.model.num_layers), pre_process=True, post_process=True,
                     vocab_size=VOCAB, padded_vocab_size=padded, sequence_parallel=sp, seed=cfg.train.seed)
    tokens, labels = batch(cfg)
    losses = model(tokens, labels=labels)  # [b, s]
    losses.mean().backward()
    allreduce_sequence_parallel_grads(model.parameters(), ctx.tp_group)
    with torch.no_grad():
        logits = model(tokens)
    grads, weights = {}, {}
    for p in model.parameters():
        g = gather_full(p.grad, p, ctx.tp_group)
        w = gather_full(p.data, p, ctx.tp_group)
        if p.global_name.endswith("word_embeddings.weight") or p.global_name == "output_layer.weight":
            g, w = g[:VOCAB], w[:VOCAB]
        grads[p.global_name], weights[p.global_name] = g.clone(), w.clone()
    if ctx.rank != 0:
        return None
    return {"losses": losses.detach(), "logits": logits, "grads": grads, "weights": weights}
