"""Layout-independent, atomic checkpoints on torch.distributed.checkpoint (DCP).

What is stored: every parameter and its optimizer state as FULL (unsharded) tensors by global name,
with vocabulary padding removed, so a checkpoint written under one TP/PP/DP/EP layout loads under any
other; plus per-rank RNG states and a JSON file (iteration, data position, scheduler, loss scaler,
model config). Nothing is unpickled on load: tensors come through DCP, the rest is JSON.

Atomicity: ranks write into `iter_XXXXXXX.partial/`; once all are done rank 0 adds `meta.json`, renames
the directory to `iter_XXXXXXX/` and only then rewrites `latest`. A crash at any point leaves the
previous checkpoint and `latest` intact; `--load` never sees a half-written checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import warnings
from typing import Dict, List, Optional

import torch
import torch.distributed.checkpoint as dcp

from megahet.data.cache import atomic_write_bytes, atomic_write_json
from megahet.errors import MegahetError
from megahet.parallel.context import ParallelContext
from megahet.parallel.sharding import full_shape, gather_param_full, shard_param_full

log = logging.getLogger("megahet")

FORMAT = "megahet-checkpoint-v1"
LATEST = "latest"
META = "meta.json"
GLOBAL = "__global__"  # pseudo parameter name for optimizer-wide state


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def check_writable(root: str) -> None:
    """Fail before training, not at the first save, when the save directory cannot be written."""
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f".write_probe_{os.getpid()}")
        with open(probe, "w") as fh:
            fh.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise MegahetError(f"cannot write checkpoints to {root} ({exc.strerror or exc}); pass a writable --save DIR") from None


def _params_by_name(model_chunks) -> Dict[str, torch.Tensor]:
    """Parameters by global name, plus persistent buffers (e.g. MoE expert biases), which are
    replicated and named like parameters."""
    out = {}
    for chunk in model_chunks:
        for p in chunk.parameters():
            out.setdefault(p.global_name, p)
        params = {id(p) for p in chunk.parameters()}
        for name, t in chunk.state_dict(keep_vars=True).items():
            if id(t) not in params and isinstance(t, torch.Tensor):
                out.setdefault(name, t)
    return out


def _vocab_trim(full: torch.Tensor, p, vocab_size: int) -> torch.Tensor:
    dim = getattr(p, "vocab_dim", None)
    return full.narrow(dim, 0, vocab_size) if dim is not None else full


def _vocab_pad(saved: torch.Tensor, p, padded_size: int) -> torch.Tensor:
    dim = getattr(p, "vocab_dim", None)
    if dim is None or saved.shape[dim] == padded_size:
        return saved
    shape = list(saved.shape)
    shape[dim] = padded_size - saved.shape[dim]
    return torch.cat([saved, torch.zeros(shape, dtype=saved.dtype)], dim=dim)


def _dcp_group(ctx: ParallelContext):
    return ctx.world_group.pg if ctx.world_size > 1 else None


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes' one process when torch.distributed is not initialised: we mean it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _is_finite(model_chunks, ctx: ParallelContext) -> bool:
    # One flag per parameter, stacked: a single host sync instead of one per parameter.
    flags = [(~torch.isfinite(p.detach())).any() for chunk in model_chunks for p in chunk.parameters()]
    bad = torch.stack(flags).any().float().reshape(1) if flags else torch.zeros(1, device=ctx.device)
    ctx.world_group.all_reduce(bad, op="max")
    return bad.item() == 0


def save_checkpoint(root: str, iteration: int, model_chunks, optimizer, ctx: ParallelContext, *,
                    vocab_size: int, meta: dict, keep_last: Optional[int] = None) -> str:
    """Write checkpoint `iteration` under `root` (every rank calls this). Returns its directory."""
    if not _is_finite(model_chunks, ctx):
        raise MegahetError(f"refusing to save iteration {iteration}: parameters contain NaN/Inf; "
                           f"lower --lr or enable --clip-grad, and resume from the last good checkpoint")
    final = iteration_dir(root, iteration)
    partial = final + ".partial"
    if ctx.rank == 0:
        check_writable(root)
        shutil.rmtree(partial, ignore_errors=True)  # debris of an interrupted save
    ctx.world_group.barrier()

    state: Dict[str, torch.Tensor] = {}
    params = _params_by_name(model_chunks)
    for name, p in params.items():
        state[f"model/{name}"] = _vocab_trim(gather_param_full(p.detach(), p, ctx), p, vocab_size).cpu()
    if optimizer is not None:
        for name, entry in optimizer.state_by_name().items():
            if isinstance(entry, torch.Tensor):  # optimizer-wide scalars (e.g. the step count)
                name, entry = GLOBAL, {name: entry}
            p = params.get(name)
            for key, t in entry.items():
                t = t.detach()
                if p is not None and t.dim() > 0:
                    t = _vocab_trim(t, p, vocab_size)
                state[f"optim/{name}/{key}"] = t.cpu()
    state[f"rng/rank{ctx.rank}/torch"] = ctx.backend.get_rng_state().cpu()
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=partial, process_group=_dcp_group(ctx))
    ctx.world_group.barrier()
    if ctx.rank == 0:
        full_meta = dict(meta, format=FORMAT, iteration=iteration, world_size=ctx.world_size,
                         layout=dict(tp=ctx.tp, pp=ctx.pp, dp=ctx.dp, ep=ctx.ep), vocab_size=vocab_size)
        atomic_write_json(os.path.join(partial, META), full_meta)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(partial, final)
        atomic_write_bytes(os.path.join(root, LATEST), os.path.basename(final).encode())
        if keep_last:
            _prune(root, keep_last)
        log.info("saved checkpoint %s", final)
    ctx.world_group.barrier()
    return final


def list_checkpoints(root: str) -> List[str]:
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if n.startswith("iter_") and not n.endswith(".partial")
             and os.path.exists(os.path.join(root, n, META))]
    return sorted(names)


def _prune(root: str, keep_last: int) -> None:
    for name in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def find_checkpoint(root: str) -> Optional[str]:
    """The latest complete checkpoint directory under `root` (or `root` itself if it is one)."""
    if os.path.exists(os.path.join(root, META)):
        return root
    pointer = os.path.join(root, LATEST)
    if os.path.exists(pointer):
        with open(pointer) as fh:
            path = os.path.join(root, fh.read().strip())
        if os.path.exists(os.path.join(path, META)):
            return path
    found = list_checkpoints(root)
    return os.path.join(root, found[-1]) if found else None


def read_meta(path: str) -> dict:
    try:
        with open(os.path.join(path, META)) as fh:
            meta = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise MegahetError(f"checkpoint {path} has no readable {META} ({exc}); point --load at a complete checkpoint") from None
    if meta.get("format") != FORMAT:
        raise MegahetError(f"{path} is not a megahet checkpoint (format {meta.get('format')!r}); check --load")
    return meta


def _saved_tensors(path: str) -> Dict[str, tuple]:
    """{key: (shape, dtype)} of every tensor in a checkpoint, read from DCP's metadata only."""
    md = dcp.FileSystemReader(path).read_metadata()
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items() if hasattr(v, "size")}


def load_checkpoint(root: str, model_chunks, optimizer, ctx: ParallelContext, *, vocab_size: int,
                    load_optimizer: bool = True) -> Optional[dict]:
    """Load the latest complete checkpoint under `root` into this rank's layout. Returns its meta
    (None when `root` holds no checkpoint yet)."""
    path = find_checkpoint(root)
    if path is None:
        return None
    return load_checkpoint_at(path, read_meta(path), model_chunks, optimizer, ctx, vocab_size=vocab_size,
                              load_optimizer=load_optimizer)


def load_checkpoint_at(path: str, meta: dict, model_chunks, optimizer, ctx: ParallelContext, *, vocab_size: int,
                       load_optimizer: bool = True) -> dict:
    """Load the checkpoint directory `path` whose meta.json the caller has already read."""
    saved = _saved_tensors(path)
    shapes = {k: v[0] for k, v in saved.items()}
    params = _params_by_name(model_chunks)
    state: Dict[str, torch.Tensor] = {}
    for name, p in params.items():
        key = f"model/{name}"
        want = list(full_shape(p, ctx.tp, ctx.ep))
        if getattr(p, "vocab_dim", None) is not None:
            want[p.vocab_dim] = vocab_size
        if key not in shapes:
            raise MegahetError(f"checkpoint {path} has no parameter {name}: it was saved from a different model; "
                               f"use the model flags it was trained with (see its {META})")
        if shapes[key] != tuple(want):
            raise MegahetError(f"checkpoint {path} holds {name} with shape {list(shapes[key])} but this model needs "
                               f"{want}: it is from a different model shape; match --num-layers/--hidden-size/... to it")
        state[key] = torch.empty(shapes[key], dtype=saved[key][1])
    opt_keys = []
    if optimizer is not None and load_optimizer:
        owners = set(params) | {GLOBAL}
        opt_keys = [k for k in shapes if k.startswith("optim/") and k[len("optim/"):].rsplit("/", 1)[0] in owners]
        for k in opt_keys:
            state[k] = torch.empty(shapes[k], dtype=saved[k][1])
    rng_key = f"rng/rank{ctx.rank}/torch"
    restore_rng = meta.get("world_size") == ctx.world_size and rng_key in shapes
    if restore_rng:
        state[rng_key] = torch.empty(shapes[rng_key], dtype=torch.uint8)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=path, process_group=_dcp_group(ctx))
    with torch.no_grad():
        for name, p in params.items():
            full = state[f"model/{name}"]
            if getattr(p, "vocab_dim", None) is not None:
                full = _vocab_pad(full, p, full_shape(p, ctx.tp, ctx.ep)[p.vocab_dim])
            p.copy_(shard_param_full(full, p, ctx).to(p.device, p.dtype))
    if opt_keys:
        by_name: Dict[str, Dict[str, torch.Tensor]] = {}
        for k in opt_keys:
            name, sub = k[len("optim/"):].rsplit("/", 1)
            t = state[k]
            p = params.get(name)
            if p is not None and t.dim() > 0 and getattr(p, "vocab_dim", None) is not None:
                t = _vocab_pad(t, p, full_shape(p, ctx.tp, ctx.ep)[p.vocab_dim])
            by_name.setdefault(name, {})[sub] = t
        flat = by_name.pop(GLOBAL, {})
        optimizer.load_state_by_name({**by_name, **flat})
    if restore_rng:
        ctx.backend.set_rng_state(state[rng_key])
    log.info("loaded checkpoint %s (iteration %s)", path, meta.get("iteration"))
    return meta
