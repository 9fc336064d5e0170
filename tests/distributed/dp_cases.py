"""Rank function for the data-parallel / optimizer equivalence tests (importable by spawned ranks).

One case = a few optimizer steps of a small GPT on `dp x tp` ranks, each replica running its share of
a fixed global batch as micro-batches of one sample. Everything a test compares comes back from every
rank: losses, grad norms, skip flags, full parameters after each step and optimizer state by name.
"""
import torch

from megahet.config import build_config
from megahet.models.gpt import GPTModel
from megahet.parallel.context import build_parallel_context
from megahet.parallel.data_parallel import DataParallel
from megahet.parallel.sharding import gather_param_full
from megahet.training.distributed_optimizer import DistributedOptimizer
from megahet.training.loss_scaler import ConstantLossScaler, DynamicLossScaler
from megahet.training.optimizer import MixedPrecisionOptimizer

VOCAB = 100
GLOBAL_BATCH = 4
SEQ = 16


def small_config(tp: int, sp: bool):
    return build_config(overrides=dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, seq_length=SEQ,
        vocab_size=VOCAB, tokenizer_type="NullTokenizer", mock_data=True, train_iters=1,
        make_vocab_size_divisible_by=8, tensor_model_parallel_size=tp, sequence_parallel=sp))


def global_batch(index: int):
    """Batch `index` of the run: tokens, labels [4, 16] and a loss mask with some zeros."""
    g = torch.Generator().manual_seed(1000 + index)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    mask = (torch.rand(GLOBAL_BATCH, SEQ, generator=g) > 0.25).float()
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), mask


def full_params(model, ctx):
    """Unsharded fp32 copies of every param by global name (padding rows of the vocabulary dropped)."""
    out = {}
    for p in model.parameters():
        w = gather_param_full(p.data, p, ctx).float()  # over TP, and over EP for experts
        if p.global_name.endswith("word_embeddings.weight") or p.global_name == "output_layer.weight":
            w = w[:VOCAB]
        out[p.global_name] = w.clone()
    return out


def _strip_padding(states):
    return {name: {k: (v[:VOCAB] if v.ndim and name.endswith("word_embeddings.weight") else v)
                   for k, v in st.items()} for name, st in states.items()}


def run_case(dp=1, tp=1, sp=False, split=None, dist_opt=False, overlap=False, bucket_size=4_000_000,
             dtype="fp32", batches=(0, 1, 2), nan_at=None, loss_scale=None, snapshot_at=None,
             load_state=None, lr=1e-2, clip_grad=0.5):
    """Run optimizer steps on batches `batches`; see the module docstring for what comes back.

    split: samples per replica (sums to GLOBAL_BATCH; default even). nan_at: step position at which
    world rank 1 poisons its gradient buffer after the reduction. loss_scale: initial dynamic scale
    (hysteresis 1). snapshot_at: record state_by_name after this many steps. load_state: a
    state_by_name dict loaded before the first step.
    """
    cfg = small_config(tp, sp)
    ctx = build_parallel_context(tp=tp, backend_name="cpu", timeout_s=60)
    assert ctx.dp == dp
    params_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    padded = -(-VOCAB // (8 * tp)) * 8 * tp
    model = GPTModel(cfg.model, ctx, layer_ids=range(2), pre_process=True, post_process=True, vocab_size=VOCAB,
                     padded_vocab_size=padded, sequence_parallel=sp, seed=cfg.train.seed, dtype=params_dtype)
    ddp = DataParallel([model], ctx, bucket_size=bucket_size, overlap_grad_reduce=overlap,
                       use_distributed_optimizer=dist_opt)
    scaler = (DynamicLossScaler(initial_scale=loss_scale, hysteresis=1) if loss_scale else ConstantLossScaler(1.0))
    cls = DistributedOptimizer if dist_opt else MixedPrecisionOptimizer
    opt = cls([model], ddp, ctx, lr=lr, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-5, clip_grad=clip_grad,
              params_dtype=params_dtype, loss_scaler=scaler)
    if load_state is not None:
        opt.load_state_by_name(load_state)
    split = split or [GLOBAL_BATCH // dp] * dp
    first = sum(split[:ctx.dp_rank])
    mine = range(first, first + split[ctx.dp_rank])

    res = {"losses": [], "grad_norms": [], "ok": [], "scales": [], "params": [full_params(model, ctx)],
           "state": None, "dtypes": None, "launched_in_backward": []}
    for i, b in enumerate(batches):
        tokens, labels, mask = global_batch(b)
        global_tokens = ctx.dp_group.all_reduce(mask[list(mine)].sum().reshape(1))  # the contract: one dp all-reduce
        scale = scaler.scale
        opt.zero_grad()
        loss_sum = torch.zeros(1, device=ctx.device)  # a collective input: on the group's device
        for j, s in enumerate(mine):
            if overlap:
                ddp.enable_grad_sync(None, j == len(mine) - 1)
            losses = model(tokens[s:s + 1], labels=labels[s:s + 1])  # [1, s] fp32
            loss = (losses * mask[s:s + 1]).sum() / global_tokens
            (loss * scale).backward()
            loss_sum += loss.detach().reshape(1)
        res["launched_in_backward"].append(sum(b.launched for buf in ddp.buffers for b in buf.buckets))
        ddp.finish_grad_sync()
        if nan_at == i and ctx.rank == 1:
            for buffer in ddp.buffers:
                buffer.data.fill_(float("nan"))
        result = opt.step()
        res["losses"].append(float(ctx.dp_group.all_reduce(loss_sum)))
        res["grad_norms"].append(result.grad_norm)
        res["ok"].append(result.ok)
        res["scales"].append(scaler.scale)
        res["params"].append(full_params(model, ctx))
        if snapshot_at == i + 1:
            res["state"] = _strip_padding(opt.state_by_name())
    res["dtypes"] = {"param": str(next(model.parameters()).dtype), "main_grad": str(ddp.params[0].main_grad.dtype),
                     "master": str(opt.pieces[0].master.dtype), "buckets": sum(len(b.buckets) for b in ddp.buffers)}
    return res


def run_pipeline_case(pp=1, dp=1, vpp_layers=None, dist_opt=False, overlap=False, bucket_size=4_000_000,
                      batches=(0, 1, 2), ep=1, over=None):
    """Whole training steps (pipeline schedule, grad sync, optimizer) through megahet.training.

    4 layers, tied embeddings: with pp > 1 the embedding lives on the first and the last stage. Every
    rank returns its losses, grad norms and the full params it holds after the last step.
    """
    from megahet.parallel.pipeline import schedule_name
    from megahet.training.optimizer_setup import build_optimizer
    from megahet.training.model_builder import build_model_chunks
    from megahet.training.train_step import train_step

    cfg = build_config(overrides={**dict(
        num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, seq_length=SEQ,
        vocab_size=VOCAB, tokenizer_type="NullTokenizer", mock_data=True, train_iters=1,
        make_vocab_size_divisible_by=8, pipeline_model_parallel_size=pp,
        num_layers_per_virtual_pipeline_stage=vpp_layers, use_distributed_optimizer=dist_opt,
        overlap_grad_reduce=overlap, ddp_bucket_size=bucket_size, lr=1e-2, weight_decay=0.1,
        adam_beta2=0.95, adam_eps=1e-5, clip_grad=0.5, micro_batch_size=1, global_batch_size=GLOBAL_BATCH,
        expert_model_parallel_size=ep), **(over or {})})
    ctx = build_parallel_context(pp=pp, ep=ep, backend_name="cpu", timeout_s=60)
    assert ctx.dp == dp
    chunks = build_model_chunks(cfg, ctx, VOCAB, -(-VOCAB // 8) * 8)
    ddp, opt = build_optimizer(cfg, ctx, chunks, ConstantLossScaler(1.0))
    per = GLOBAL_BATCH // dp
    res = {"losses": [], "grad_norms": [], "ok": [], "buckets": sum(len(b.buckets) for b in ddp.buffers)}
    for b in batches:
        tokens, labels, mask = global_batch(b)
        mbs = [{"tokens": tokens[s:s + 1], "labels": labels[s:s + 1], "loss_mask": mask[s:s + 1]}
               for s in range(ctx.dp_rank * per, (ctx.dp_rank + 1) * per)]
        out = train_step(chunks, ddp, opt, ctx, mbs, schedule=schedule_name(cfg, len(mbs)))
        res["losses"].append(out.loss)
        res["grad_norms"].append(out.grad_norm)
        res["ok"].append(out.ok)
    res["params"] = {}
    for chunk in chunks:
        res["params"].update(full_params(chunk, ctx))
    res["state"] = _strip_padding(opt.state_by_name())
    return res
