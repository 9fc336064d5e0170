"""Rank functions for the sharded-checkpoint tests: memory while saving/loading, pickle-free resume."""
import gc
import os
import pickle
import time

import torch

from megahet.config import build_config
from megahet.memory_probe import PeakSampler, exact_malloc_accounting
from megahet.training import checkpoint as ckpt
from megahet.training.model_builder import build_model_chunks
from megahet.training.optimizer_setup import build_optimizer
from megahet.training.loss_scaler import build_loss_scaler
from megahet.training.pretrain import build_context
from tests.distributed.train_cases import train

MEM_MODEL = dict(num_layers=4, hidden_size=256, ffn_hidden_size=1024, num_attention_heads=4, num_query_groups=4,
                 seq_length=16, mock_data=True, micro_batch_size=1, global_batch_size=8, lr=1e-3,
                 make_vocab_size_divisible_by=128, seed=3, distributed_timeout_s=60, train_iters=1)
VOCAB = 2000


def _build(over):
    cfg = build_config(overrides={**MEM_MODEL, **over})
    ctx = build_context(cfg)
    padded = ((VOCAB + 128 * ctx.tp - 1) // (128 * ctx.tp)) * 128 * ctx.tp
    chunks = build_model_chunks(cfg, ctx, VOCAB, padded)
    ddp, opt = build_optimizer(cfg, ctx, chunks, build_loss_scaler(False, None, 2 ** 16))
    return cfg, ctx, chunks, ddp, opt


def measure_save_load(root: str, over: dict):
    """Save and load a ~5M-parameter model with real Adam state; report the extra memory of each and
    what bounds it (the largest stored box) against what this rank holds."""
    exact_malloc_accounting()
    cfg, ctx, chunks, ddp, opt = _build(over)
    gen = torch.Generator().manual_seed(0)  # the same grads on every rank, as after a real all-reduce
    for buf in ddp.buffers:
        buf.data.copy_(torch.randn(buf.data.shape, generator=gen) * 1e-3)
    opt.step()
    held = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    held += sum(sum(t.numel() * 4 for t in st.values()) for _, _, _, st in opt.owned_state())
    items = ckpt._items(chunks, opt, ctx, VOCAB)
    largest = max(it.part.sizes and torch.Size(it.part.sizes).numel() * it.source.element_size() for it in items)
    gc.collect()
    with PeakSampler() as s:
        path = ckpt.save_checkpoint(root, 1, chunks, opt, ctx, vocab_size=VOCAB, meta={"config": cfg.to_dict()})
    save_extra = s.extra
    weights = {n: p.detach().clone() for c in chunks for n, p in c.named_parameters()}
    for c in chunks:
        for p in c.parameters():
            p.data.zero_()
    del items
    gc.collect()
    with PeakSampler() as s:
        ckpt.load_checkpoint(root, chunks, opt, ctx, vocab_size=VOCAB)
    load_extra = s.extra
    def real(t, p):  # vocabulary padding rows are not stored
        dim = getattr(p, "vocab_dim", None)
        return t if dim is None else t.narrow(dim, 0, max(0, min(t.shape[dim], VOCAB - ctx.tp_rank * t.shape[dim])))
    same = all(torch.equal(real(weights[n], p), real(p, p)) for c in chunks for n, p in c.named_parameters())
    files = {f: os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")}
    return dict(save_extra=save_extra, load_extra=load_extra, held=held, largest=largest, same=same, files=files)


def _no_unpickling(*args, **kwargs):
    raise AssertionError("something was unpickled")


def train_without_pickle(over: dict):
    """pretrain() with every unpickling entry point disabled (resume must not need one)."""
    pickle.load = pickle.loads = _no_unpickling
    torch.load = _no_unpickling
    return train(over)


def hang_in_all_reduce(stop_peer: bool = False):
    """Rank 1 hangs after one all-reduce (sleeping, or SIGSTOPped by rank 0 when `stop_peer`); rank 0's
    next all-reduce must fail with a one-line error naming rank 1 and where it is, not wait forever."""
    import signal
    from megahet.errors import MegahetError
    from megahet.parallel.context import build_parallel_context
    ctx = build_parallel_context(backend_name="cpu", timeout_s=3.0)
    pids = torch.tensor([float(os.getpid()) if r == ctx.rank else 0.0 for r in range(2)], dtype=torch.float64,
                        device=ctx.device)
    ctx.world_group.all_reduce(pids)
    ctx.progress.step = 7
    if ctx.rank == 1:
        time.sleep(9.0 if stop_peer else 6.0)  # SIGSTOPped meanwhile when stop_peer
        try:
            ctx.world_group.barrier()  # after being continued: rank 0 has given up by then
        except MegahetError:
            pass
        return None
    if stop_peer:
        time.sleep(2.0)  # a few heartbeats (0.75 s apart) carry rank 1's step first
        os.kill(int(pids[1].item()), signal.SIGSTOP)
    try:
        ctx.world_group.all_reduce(torch.ones(4, device=ctx.device))
    except MegahetError as exc:
        return str(exc)
    finally:
        if stop_peer:
            os.kill(int(pids[1].item()), signal.SIGCONT)
    return "no error"


def hang_in_bridged_exchanges():
    """cpu, cpu, sim: rank 2 (sim) hangs. Ranks 0 and 1's hierarchical all-reduce over the dp group and
    rank 1's pipeline-link exchange with rank 2 must each fail with the one-line error naming rank 2."""
    from megahet.errors import MegahetError
    from megahet.parallel.context import RankSpec, build_parallel_context
    from megahet.parallel.links import Recv
    ctx = build_parallel_context(rank_specs=[RankSpec("cpu"), RankSpec("cpu"), RankSpec("sim")], timeout_s=3.0)
    if ctx.rank == 2:
        time.sleep(15.0)
        return None
    out = []
    try:
        ctx.dp_group.all_reduce(torch.ones(8, device=ctx.device))
    except MegahetError as exc:
        out.append(str(exc))
    if ctx.rank == 1:
        try:
            ctx.links.exchange([], [Recv((4,), torch.float32, 2)])
        except MegahetError as exc:
            out.append(str(exc))
    if ctx.rank == 0:
        time.sleep(6.0)  # rank 0 serves the store (env://): keep it up while rank 1 reads rank 2's heartbeat
    return out
