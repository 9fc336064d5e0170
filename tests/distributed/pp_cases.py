"""Rank functions for pipeline equivalence tests: losses and full gradients by parameter name."""
import torch

from megahet.config import build_config
from megahet.parallel.context import build_parallel_context
from megahet.parallel.grad_sync import allreduce_embedding_grads, allreduce_sequence_parallel_grads
from megahet.parallel.pipeline import forward_backward
from megahet.training.model_builder import build_model_chunks as _build
from megahet.parallel.sharding import gather_full

VOCAB = 96


def make_cfg(**over):
    base = dict(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, seq_length=8,
                vocab_size=VOCAB, tokenizer_type="NullTokenizer", mock_data=True, train_iters=1,
                make_vocab_size_divisible_by=8, micro_batch_size=2, global_batch_size=8)
    base.update(over)
    return build_config(overrides=base)


def microbatches(cfg, n, mbs, seed=3):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, VOCAB, (n * mbs, cfg.model.seq_length + 1), generator=g)
    out = []
    for i in range(n):
        chunk = data[i * mbs:(i + 1) * mbs]
        out.append({"tokens": chunk[:, :-1], "labels": chunk[:, 1:], "loss_mask": torch.ones(mbs, cfg.model.seq_length)})
    return out


def build_chunks(cfg, ctx):
    return _build(cfg, ctx, VOCAB, -(-VOCAB // (8 * ctx.tp)) * 8 * ctx.tp)


def run_pipeline(world, over, schedule="1f1b", num_mb=4, mbs=2):
    """One forward/backward; every rank returns (loss_sum, tokens, {name: full grad})."""
    cfg = make_cfg(**over)
    p = cfg.parallel
    ctx = build_parallel_context(tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size,
                                 backend_name="cpu", timeout_s=60)
    chunks = build_chunks(cfg, ctx)
    # Replica d takes a contiguous slice of the global micro-batches.
    all_mbs = microbatches(cfg, num_mb, mbs)
    per = num_mb // ctx.dp
    mine = all_mbs[ctx.dp_rank * per:(ctx.dp_rank + 1) * per]
    global_tokens = float(sum(mb["loss_mask"].sum() for mb in all_mbs))
    out = forward_backward(chunks, mine, ctx, global_tokens=global_tokens, schedule=schedule)
    params = [q for c in chunks for q in c.parameters()]
    allreduce_sequence_parallel_grads(params, ctx.tp_group)
    allreduce_embedding_grads(params, ctx.embedding_group)
    for q in params:
        ctx.dp_group.all_reduce(q.grad)
    loss = out.loss_sum.clone()
    ctx.world_group.all_reduce(loss if ctx.is_last_stage and ctx.tp_rank == 0 else loss.zero_())
    grads = {}
    for q in params:
        g = gather_full(q.grad, q, ctx.tp_group)
        if q.global_name.endswith("word_embeddings.weight"):
            g = g[:VOCAB]
        grads[q.global_name] = g.clone()
    return float(loss), grads


def run_varying_shapes(world):
    """Two steps whose micro-batch size and sequence length differ: the P2P handshake carries shapes."""
    cfg = make_cfg(pipeline_model_parallel_size=world)
    ctx = build_parallel_context(pp=world, backend_name="cpu", timeout_s=60)
    chunks = build_chunks(cfg, ctx)
    out = []
    for n, mbs, seq in ((2, 2, 8), (3, 3, 5)):
        g = torch.Generator().manual_seed(seq)
        data = torch.randint(0, VOCAB, (n * mbs, seq + 1), generator=g)
        mbs_list = [{"tokens": data[i * mbs:(i + 1) * mbs, :-1], "labels": data[i * mbs:(i + 1) * mbs, 1:],
                     "loss_mask": torch.ones(mbs, seq)} for i in range(n)]
        res = forward_backward(chunks, mbs_list, ctx, global_tokens=float(n * mbs * seq), schedule="1f1b")
        loss = res.loss_sum.clone()
        ctx.world_group.all_reduce(loss if ctx.is_last_stage else loss.zero_())
        out.append(float(loss))
    return out
