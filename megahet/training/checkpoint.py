"""Sharded, layout-independent, atomic checkpoints (format: megahet.training.checkpoint_format).

What is stored: each rank writes only the slices it owns, as boxes of the global (unsharded, vocabulary
padding removed) tensors: `model/<name>` from one replica of every shard, `optim/<name>/<master|exp_avg|
exp_avg_sq>` from every ZeRO owner (or from one replica without ZeRO), and `rng/rank<r>/torch`. Loading
reads only the boxes a rank needs, so any TP/PP/DP/EP layout loads any other, and no rank ever holds a
full tensor it does not own (extra memory: one box at a time). Nothing is unpickled: JSON + safetensors.

Atomicity: ranks write into `iter_XXXXXXX.partial/`; once all are done rank 0 merges the index, adds
`meta.json`, renames the directory to `iter_XXXXXXX/` and only then rewrites `latest`. A crash or a
failed write at any point leaves the previous checkpoint and `latest` intact.

Integrity: index.json records every file's size and sha256. A load checks them collectively (file i is
hashed by rank i % world) before reading any tensor; a damaged checkpoint is a one-line error naming
the file, or, with `fallback`, the previous complete checkpoint is loaded instead.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from megahet.data.cache import atomic_write_bytes, atomic_write_json
from megahet.errors import MegahetError
from megahet.parallel.context import ParallelContext
from megahet.training import checkpoint_format as fmt
from megahet.training.checkpoint_format import FORMAT, LATEST, META, CheckpointReader  # noqa: F401 (re-exported)
from megahet.training.checkpoint_layout import Part, global_shape, parts, writes_optimizer_state, writes_weights

log = logging.getLogger("megahet")

STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")


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


def _is_finite(model_chunks, ctx: ParallelContext) -> bool:
    # NaN/Inf anywhere makes a param's fp32 sum non-finite: one read pass, no mask allocated (a sum of
    # finite weights cannot overflow fp32 at any model size). Stacked: a single host sync.
    sums = [p.detach().sum(dtype=torch.float32) for chunk in model_chunks for p in chunk.parameters()]
    bad = (~torch.isfinite(torch.stack(sums))).any().float().reshape(1) if sums else torch.zeros(1, device=ctx.device)
    ctx.world_group.all_reduce(bad, op="max")
    return bad.item() == 0


# ---------------------------------------------------------------------- saving
@dataclass
class _Item:
    """One stored box: `source` is the rank's flat data it is a view of (a param or an optimizer piece)."""
    name: str
    gshape: Tuple[int, ...]
    part: Part
    source: torch.Tensor

    def tensor(self) -> torch.Tensor:
        return self.part.view(self.source)  # [*part.sizes]


def _items(model_chunks, optimizer, ctx: ParallelContext, vocab_size: int) -> List[_Item]:
    """Everything this rank stores: its owned boxes of weights, optimizer pieces and its RNG state."""
    out: List[_Item] = []
    for name, p in _params_by_name(model_chunks).items():
        if writes_weights(p, ctx):
            flat = p.detach().reshape(-1)
            out += [_Item(f"model/{name}", global_shape(p, ctx, vocab_size), pt, flat) for pt in parts(p, ctx, vocab_size)]
    if optimizer is not None:
        sharded = getattr(optimizer, "sharded_over_dp", False)
        for p, lo, hi, state in optimizer.owned_state():
            if not writes_optimizer_state(p, ctx, sharded):
                continue
            shape, pieces = global_shape(p, ctx, vocab_size), parts(p, ctx, vocab_size, lo, hi)
            for key in STATE_KEYS:
                out += [_Item(f"optim/{p.global_name}/{key}", shape, pt, state[key].detach()) for pt in pieces]
    rng = ctx.backend.get_rng_state().cpu().reshape(-1)
    out.append(_Item(f"rng/rank{ctx.rank}/torch", tuple(rng.shape), Part(0, tuple(rng.shape), (0,), tuple(rng.shape), (0,)),
                     rng))
    return out


def _write_rank_file(partial: str, rank: int, items: List[Tuple[_Item, torch.Tensor]], opener=open) -> None:
    """Write this rank's safetensors file and sidecar. `items` pairs each item with the tensor to store."""
    specs, entries = [], []
    for i, (it, t) in enumerate(items):
        key = f"{it.name}@{i}"
        specs.append((key, t.dtype, tuple(t.shape)))
        entries.append({"name": it.name, "shape": list(it.gshape), "dtype": fmt.dtype_name(t.dtype), "key": key,
                        "offsets": list(it.part.global_offsets), "sizes": list(it.part.sizes)})
    info = None
    if specs:
        writer = fmt.ShardFileWriter(os.path.join(partial, fmt.rank_file(rank)), specs, opener=opener)
        try:
            for (key, _, _), (_, t) in zip(specs, items):
                writer.write(key, t)
            info = writer.close()
        except BaseException:
            writer.abort()
            raise
    fmt.write_sidecar(partial, rank, info, entries)


@dataclass
class PendingSave:
    """A save whose rank files are (being) written; `finish_save` makes it a checkpoint."""
    root: str
    iteration: int
    meta: dict
    keep_last: Optional[int]
    error: List[BaseException] = field(default_factory=list)  # filled by the writer (thread or inline)

    @property
    def partial(self) -> str:
        return iteration_dir(self.root, self.iteration) + ".partial"


def begin_save(root: str, iteration: int, model_chunks, optimizer, ctx: ParallelContext, *, vocab_size: int,
               meta: dict, keep_last: Optional[int] = None) -> Tuple[PendingSave, List[_Item]]:
    """Collective part before writing: refuse NaN weights, prepare `.partial`, list this rank's boxes."""
    if not _is_finite(model_chunks, ctx):
        raise MegahetError(f"refusing to save iteration {iteration}: parameters contain NaN/Inf; "
                           f"lower --lr or enable --clip-grad, and resume from the last good checkpoint")
    pending = PendingSave(root, iteration, dict(meta, optimizer_steps=getattr(optimizer, "num_steps", 0)), keep_last)
    ok = torch.ones(1, device=ctx.device)  # collective input: on the group's device
    if ctx.rank == 0:
        try:
            check_writable(root)
            shutil.rmtree(pending.partial, ignore_errors=True)  # debris of an interrupted save
            os.makedirs(pending.partial)
        except (OSError, MegahetError) as exc:
            ok.zero_()
            pending.error.append(exc)
    ctx.world_group.all_reduce(ok, op="min")  # also the barrier: .partial exists before anyone writes
    if ok.item() == 0:
        raise MegahetError(f"cannot create checkpoint directory {pending.partial} "
                           f"({pending.error[0] if pending.error else 'see rank 0'}); pass a writable --save DIR")
    return pending, _items(model_chunks, optimizer, ctx, vocab_size)


def write_items(pending: PendingSave, rank: int, items: List[Tuple[_Item, torch.Tensor]], opener=open) -> None:
    """Write this rank's file; an OSError is recorded for `finish_save` (never raised half-way)."""
    try:
        _write_rank_file(pending.partial, rank, items, opener=opener)
    except OSError as exc:
        pending.error.append(exc)


def finish_save(pending: PendingSave, ctx: ParallelContext, vocab_size: int) -> str:
    """Collective: agree that every rank wrote, then rank 0 publishes the checkpoint atomically."""
    errnos = torch.zeros(ctx.world_size, device=ctx.device)  # collective input: on the group's device
    if pending.error:
        exc = pending.error[0]
        errnos[ctx.rank] = float(getattr(exc, "errno", None) or -1)
    ctx.world_group.all_reduce(errnos)  # one collective tells every rank which ranks failed, and why
    failed = [(r, int(e)) for r, e in enumerate(errnos.tolist()) if e != 0]
    final = iteration_dir(pending.root, pending.iteration)
    if not failed and ctx.rank == 0:
        try:
            fmt.merge_index(pending.partial, ctx.world_size)
            full_meta = dict(pending.meta, format=FORMAT, iteration=pending.iteration, world_size=ctx.world_size,
                             layout=dict(tp=ctx.tp, pp=ctx.pp, dp=ctx.dp, ep=ctx.ep), vocab_size=vocab_size)
            atomic_write_json(os.path.join(pending.partial, META), full_meta)
            if os.path.exists(final):
                _remove(final)
            os.replace(pending.partial, final)
            atomic_write_bytes(os.path.join(pending.root, LATEST), os.path.basename(final).encode())
        except OSError as exc:
            failed = [(0, exc.errno or -1)]
    flag = torch.tensor([float(failed[0][0] + 1) if failed else 0.0, float(failed[0][1]) if failed else 0.0],
                        device=ctx.device)
    ctx.world_group.all_reduce(flag, op="max")  # rank 0's publish step may fail too
    if flag[0].item() or failed:
        rank, errno = failed[0] if failed else (int(flag[0].item()) - 1, int(flag[1].item()))
        if ctx.rank == 0:
            shutil.rmtree(pending.partial, ignore_errors=True)
        why = os.strerror(errno) if errno > 0 else "write failed"
        raise MegahetError(f"saving checkpoint iteration {pending.iteration} failed on rank {rank}: {why} "
                           f"(under {pending.root}); nothing was published and the previous checkpoint is intact: "
                           f"free space or fix --save, then resume")
    if ctx.rank == 0:
        if pending.keep_last:
            _prune(pending.root, pending.keep_last)
        log.info("saved checkpoint %s", final)
    return final


def save_checkpoint(root: str, iteration: int, model_chunks, optimizer, ctx: ParallelContext, *,
                    vocab_size: int, meta: dict, keep_last: Optional[int] = None, opener=open) -> str:
    """Write checkpoint `iteration` under `root` (every rank calls this). Returns its directory.

    Each box goes from the device to the file one at a time: extra memory is the largest box.
    `opener` replaces `open` for the data file (fault-injection tests).
    """
    pending, items = begin_save(root, iteration, model_chunks, optimizer, ctx, vocab_size=vocab_size,
                                meta=meta, keep_last=keep_last)
    write_items(pending, ctx.rank, [(it, it.tensor()) for it in items], opener=opener)
    return finish_save(pending, ctx, vocab_size)


def list_checkpoints(root: str) -> List[str]:
    return fmt.complete_checkpoints(root)


def _remove(path: str) -> None:
    """Delete a checkpoint directory, meta.json first: a kill half-way leaves it incomplete, never loadable."""
    try:
        os.remove(os.path.join(path, META))
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def _prune(root: str, keep_last: int) -> None:
    for name in list_checkpoints(root)[:-keep_last]:
        _remove(os.path.join(root, name))


def find_checkpoint(root: str) -> Optional[str]:
    """The latest complete checkpoint directory under `root` (or `root` itself if it is one)."""
    return fmt.find_checkpoint_dir(root)


def read_meta(path: str) -> dict:
    meta = fmt.read_json(os.path.join(path, META), "meta")
    if meta.get("format") != FORMAT:
        raise MegahetError(f"{path} is not a {FORMAT} checkpoint (format {meta.get('format')!r}); older megahet "
                           f"checkpoints kept pickled metadata and are not loaded: re-save with this version")
    return meta


# ---------------------------------------------------------------------- loading
def verify_checkpoint(path: str, ctx: ParallelContext) -> Optional[str]:
    """Collective integrity check of checkpoint `path`: None when sound, else a one-line reason (the same
    on every rank). Each data file is hashed by one rank only (file i by rank i % world)."""
    problem = None
    files: List[Tuple[str, dict]] = []
    try:
        CheckpointReader(path, verify=False)  # meta + index readable, right format
        files = sorted(fmt.read_json(os.path.join(path, fmt.INDEX), "index")["files"].items())
    except MegahetError as exc:
        problem = str(exc)
    head = torch.tensor([1.0 if problem else 0.0, float(len(files))], device=ctx.device)
    ctx.world_group.all_reduce(head, op="max")
    if head[0].item():
        return problem or f"checkpoint {path} has an unreadable meta.json or index.json on some rank"
    bad = torch.zeros(len(files), device=ctx.device)
    for i, (name, info) in enumerate(files):
        if i % ctx.world_size == ctx.rank:
            try:
                fmt.check_file(path, name, info, checksum=True)
            except MegahetError:
                bad[i] = 1.0
    ctx.world_group.all_reduce(bad, op="max")
    for i, (name, info) in enumerate(files):
        if bad[i].item():
            try:
                fmt.check_file(path, name, info, checksum=True)  # every rank builds the same message
            except MegahetError as exc:
                return str(exc)
            return f"checkpoint file {os.path.join(path, name)} fails its checks on rank {i % ctx.world_size}"
    return None


def _candidates(root: str) -> List[str]:
    """The checkpoint to load first (`latest`), then older complete ones, newest first."""
    first = fmt.find_checkpoint_dir(root)
    if first is None:
        return []
    if os.path.abspath(first) == os.path.abspath(root):
        return [first]
    older = [os.path.join(root, n) for n in reversed(fmt.complete_checkpoints(root))]
    return [first] + [p for p in older if os.path.abspath(p) != os.path.abspath(first)]


def load_checkpoint(root: str, model_chunks, optimizer, ctx: ParallelContext, *, vocab_size: int,
                    load_optimizer: bool = True, fallback: bool = False) -> Optional[dict]:
    """Load the latest complete checkpoint under `root` into this rank's layout. Returns its meta
    (None when `root` holds no checkpoint yet).

    A damaged checkpoint (missing, truncated or corrupt file) raises a one-line MegahetError naming the
    file; with `fallback` the previous complete checkpoint is tried instead (and so on).
    """
    candidates = _candidates(root)
    for i, path in enumerate(candidates):
        problem = verify_checkpoint(path, ctx)
        if problem is None:
            return load_checkpoint_at(path, read_meta(path), model_chunks, optimizer, ctx, vocab_size=vocab_size,
                                      load_optimizer=load_optimizer)
        older = candidates[i + 1] if i + 1 < len(candidates) else None
        if fallback and older:
            log.warning("%s; falling back to %s", problem, older)
            continue
        hint = (f" (pass --load-fallback to resume from the previous checkpoint {os.path.basename(older)})"
                if older and not fallback else "")
        raise MegahetError(problem + hint)
    return None


def _read_parts(reader: CheckpointReader, name: str, flat: torch.Tensor, pieces: List[Part]) -> None:
    for pt in pieces:
        reader.read_slice(name, pt.global_offsets, pt.sizes, out=pt.view(flat))


def _check_shape(reader: CheckpointReader, key: str, name: str, want: Tuple[int, ...]) -> None:
    if not reader.has(key):
        raise MegahetError(f"checkpoint {reader.path} has no parameter {name}: it was saved from a different model; "
                           f"use the model flags it was trained with (see its {META})")
    if reader.shape(key) != tuple(want):
        raise MegahetError(f"checkpoint {reader.path} holds {name} with shape {list(reader.shape(key))} but this model "
                           f"needs {list(want)}: it is from a different model shape; match --num-layers/--hidden-size/... to it")


@torch.no_grad()
def load_checkpoint_at(path: str, meta: dict, model_chunks, optimizer, ctx: ParallelContext, *, vocab_size: int,
                       load_optimizer: bool = True) -> dict:
    """Load the (verified) checkpoint directory `path` whose meta.json the caller has already read."""
    reader = CheckpointReader(path, verify=False)
    params = _params_by_name(model_chunks)
    for name, p in params.items():
        _check_shape(reader, f"model/{name}", name, global_shape(p, ctx, vocab_size))
    for name, p in params.items():
        flat = p.detach().view(-1)  # the param's own storage: boxes are read straight into it
        if getattr(p, "vocab_dim", None) is not None:
            flat.zero_()  # vocabulary padding rows are not stored
        _read_parts(reader, f"model/{name}", flat, parts(p, ctx, vocab_size))
    if meta.get("model_only") and optimizer is not None and load_optimizer:
        log.info("%s holds weights only: the optimizer starts fresh from them", path)
        optimizer.reload_model_params()
    elif optimizer is not None and load_optimizer:
        def read_piece(p, lo, hi) -> Dict[str, torch.Tensor]:
            out = {}
            for key in STATE_KEYS:
                # [hi - lo]; zeros only where vocabulary padding is not stored
                alloc = torch.zeros if getattr(p, "vocab_dim", None) is not None else torch.empty
                flat = alloc(hi - lo, dtype=torch.float32, device=p.device)
                _read_parts(reader, f"optim/{p.global_name}/{key}", flat, parts(p, ctx, vocab_size, lo, hi))
                out[key] = flat
            return out
        for name, p in params.items():
            if isinstance(p, torch.nn.Parameter) and p.requires_grad:
                _check_shape(reader, f"optim/{name}/master", name, global_shape(p, ctx, vocab_size))
        optimizer.load_owned_state(read_piece, int(meta.get("optimizer_steps", 0)))
    rng_key = f"rng/rank{ctx.rank}/torch"
    if meta.get("world_size") == ctx.world_size and reader.has(rng_key):
        ctx.backend.set_rng_state(reader.read(rng_key))
    reader.close()
    log.info("loaded checkpoint %s (iteration %s)", path, meta.get("iteration"))
    return meta
