"""Rank functions for the expert-parallel equivalence tests (importable by spawned ranks).

Every run trains on the same SHARDS micro-batches of a small MoE GPT: the reference is one rank
running all of them as micro-batches; an EP=n run gives data-parallel rank d the shards
[d * SHARDS/dp, (d+1) * SHARDS/dp). Losses are token-weighted over the global batch and the aux
losses are scaled through the tracker, so all layouts must produce the same numbers.
"""
import torch

from megahet.config import build_config
from megahet.errors import MegahetError
from megahet.models.gpt import GPTModel
from megahet.models.transformer import is_moe_layer
from megahet.moe import MoETracker
from megahet.parallel.context import RankSpec, build_parallel_context
from megahet.parallel.grad_sync import allreduce_sequence_parallel_grads
from megahet.parallel.sharding import gather_full

VOCAB, SHARDS, MBS = 64, 4, 2


def moe_config(**over):
    base = dict(num_layers=3, hidden_size=32, ffn_hidden_size=32, num_attention_heads=4, seq_length=8,
                vocab_size=VOCAB, tokenizer_type="NullTokenizer", mock_data=True, train_iters=1,
                make_vocab_size_divisible_by=8, num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=16,
                moe_shared_expert_intermediate_size=16, moe_layer_freq=2, moe_aux_loss_coeff=0.01,
                moe_z_loss_coeff=0.001, moe_router_enable_expert_bias=True)
    base.update(over)
    return build_config(overrides=base)


def shard(cfg, r):
    g = torch.Generator().manual_seed(100 + r)
    tokens = torch.randint(0, VOCAB, (MBS, cfg.model.seq_length + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _gather_param(t, p, ctx):
    """Full tensor of a (TP- and EP-sharded) parameter-shaped tensor: TP first, then experts over EP."""
    full = gather_full(t, p, ctx.tp_group)
    if getattr(p, "is_expert", False) and ctx.ep_group.size > 1:
        stacked = ctx.ep_group.all_gather(full.detach().contiguous().unsqueeze(0), dim=0)  # [ep, *full]
        full = torch.cat(list(stacked.unbind(0)), dim=p.ep_dim)
    return full


def run_moe(ep, tp=1, sp=False, variants=({},)):
    """For each variant (config overrides): forward/backward over this rank's shards.

    Returns per variant: losses {shard: [b, s]}, tracker report, and on rank 0 full grads and expert
    biases (after one bias update) by name.
    """
    ctx = build_parallel_context(tp=tp, ep=ep, backend_name="cpu", timeout_s=60)
    results = []
    for over in variants:
        cfg = moe_config(tensor_model_parallel_size=tp, expert_model_parallel_size=ep, sequence_parallel=sp, **over)
        m = cfg.model
        tracker = MoETracker.from_config(m)
        assert tracker.moe_layer_ids == [i for i in range(m.num_layers) if is_moe_layer(m, i)] == [0, 2]
        padded = -(-VOCAB // (8 * tp)) * 8 * tp
        model = GPTModel(m, ctx, layer_ids=range(m.num_layers), pre_process=True, post_process=True,
                         vocab_size=VOCAB, padded_vocab_size=padded, sequence_parallel=sp, seed=cfg.train.seed,
                         moe_tracker=tracker)
        per_rank = SHARDS // ctx.dp
        mine = range(ctx.dp_rank * per_rank, (ctx.dp_rank + 1) * per_rank)
        global_tokens = SHARDS * MBS * m.seq_length
        tracker.reset()
        losses = {}
        for r in mine:
            tokens, labels = shard(cfg, r)
            tracker.aux_loss_scale = tokens.numel() / global_tokens
            loss = model(tokens, labels=labels)  # [b, s]
            (loss.sum() / global_tokens).backward()
            losses[r] = loss.detach()
        # What the data-parallel code does: TP-partial grads first, then sum over replicas (experts
        # only over the ranks holding the same experts).
        allreduce_sequence_parallel_grads(model.parameters(), ctx.tp_group)
        for p in model.parameters():
            (ctx.expert_dp_group if getattr(p, "is_expert", False) else ctx.dp_group).all_reduce(p.grad)
        report = tracker.report(ctx)
        tracker.update_expert_bias(ctx)
        grads = {}
        for p in model.parameters():
            g = _gather_param(p.grad, p, ctx)
            grads[p.global_name] = (g[:VOCAB] if "word_embeddings" in p.global_name else g).clone()
        biases = {n: b.clone() for n, b in model.named_buffers() if n.endswith("expert_bias")}
        shapes = {p.global_name: (tuple(p.shape), getattr(p, "is_expert", False)) for p in model.parameters()}
        out = {"losses": losses if ctx.tp_rank == 0 else {}, "report": report, "shapes": shapes}
        if ctx.rank == 0:
            out.update(grads=grads, biases=biases)
        results.append(out)
    return results


def build_ep_across_domains():
    """EP=2 over a cpu rank and a sim rank: the context must refuse it. Returns the error text."""
    try:
        build_parallel_context(ep=2, rank_specs=[RankSpec("cpu"), RankSpec("sim")], timeout_s=60)
    except MegahetError as exc:
        return str(exc)
    return None


def tracker_across_stages():
    """PP=2: each stage records only its own MoE layer; every rank's report covers both."""
    ctx = build_parallel_context(pp=2, backend_name="cpu", timeout_s=60)
    tracker = MoETracker(4, [0, 2], 4)
    tracker.aux_loss_scale = 0.5
    layer = 0 if ctx.pp_rank == 0 else 2
    tracker.record(layer, aux=torch.tensor(1.0 + layer), z=torch.tensor(3.0),
                   tokens_per_expert=torch.tensor([1, 2, 3, 4]) * (layer + 1))
    return tracker.report(ctx)
