"""Measure what the cost model needs on a backend present here: layer times, activation bytes, links.

One dense layer, one MoE layer (MoE models), the embedding and the output head with its loss are
timed forward and backward at each candidate micro-batch size, with the thread count each rank will
have; the bytes autograd keeps for backward are counted per token (saved-tensor hooks, deduplicated by
storage, parameters excluded), with and without recompute; an AdamW step gives seconds per parameter.
Results are cached as JSON under $MEGAHET_CACHE_DIR/profiles keyed by (backend, shape, dtype, threads,
torch version), so planning again is free. A TP shard, and a MoE layer's TP/EP shard, is timed with its
peers, every local group at once (`load_or_measure_shards_together`, keys cost_model.shard_key's
"<what>@tp<t>/<mbs>", "moe@ep<e>/<mbs>", collectives included); where a degree was not timed, a shard's
compute is the layer's time / tp and its collectives come from the link model.

Ranks that will share this host (the cluster's cpu and sim ranks) are profiled together, each in its
own process at the same time (`load_or_measure_together`), and each group gets its own profile: a sim
rank slowed by its neighbours, idling as the sim backend does, is measured rather than assumed to run
at `speed` x an unloaded CPU.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.checkpoint import checkpoint

from megahet.errors import MegahetError

log = logging.getLogger("megahet")

Progress = Callable[[int, int, str], None]


@dataclass
class Profile:
    """Measured figures of one backend for one model shape (seconds; bytes per token)."""
    backend: str
    key: str
    times: Dict[str, List[float]] = field(default_factory=dict)        # "what/mbs" -> [fwd, bwd]
    act_bytes: Dict[str, float] = field(default_factory=dict)          # "what/recompute" -> bytes per token
    optimizer_s_per_param: float = 0.0
    peak_tflops: float = 0.0
    links: Dict[str, List[float]] = field(default_factory=dict)         # kind -> [bytes/s, latency s]
    reserved_bytes: float = 0.0  # what a rank holds outside the model (process_memory.runtime_overhead)

    def time(self, what: str, mbs: int) -> Tuple[float, float]:
        """(fwd, bwd) seconds at micro-batch `mbs`: measured, interpolated between the two measured sizes
        around it, or beyond the measured range scaled in proportion from the nearest one (a line
        through two noisy small sizes can extrapolate to negative times)."""
        hit = self.times.get(f"{what}/{mbs}")
        if hit:
            return hit[0], hit[1]
        pts = sorted((int(k.split("/")[1]), v) for k, v in self.times.items() if k.split("/")[0] == what)
        if not pts:
            if what == "embed":
                return 0.0, 0.0
            raise MegahetError(f"profile {self.key} has no '{what}' timings; delete the profile cache and re-run")
        if len(pts) == 1 or mbs > pts[-1][0] or mbs < pts[0][0]:
            b, (f, w) = pts[-1] if mbs > pts[-1][0] else pts[0]
            return f * mbs / b, w * mbs / b
        (b0, v0), (b1, v1) = _bracket(pts, mbs)
        return tuple(v0[i] + (v1[i] - v0[i]) * (mbs - b0) / (b1 - b0) for i in (0, 1))  # type: ignore

    def measured(self, what: str) -> bool:
        """Whether `what` (e.g. "dense", "head@tp2") was timed at any micro-batch size."""
        return any(k.split("/")[0] == what for k in self.times)

    def recompute_time(self, what: str, mbs: int) -> Optional[Tuple[float, float]]:
        """(fwd, bwd) seconds of `what` under full recompute at micro-batch `mbs` (the backward reruns the
        forward): `time(what, mbs)` scaled by the measured ratio of a checkpointed layer to a plain one,
        or None when not measured (then the cost model adds one forward)."""
        hit = [(int(k.split("/")[1]), v) for k, v in self.times.items() if k.split("/")[0] == f"{what}-recompute"]
        if not hit:
            return None
        b0, (cf, cb) = hit[0]
        f, b = self.time(what, b0)
        if f <= 0 or f + b <= 0:
            return None
        fwd, bwd = self.time(what, mbs)
        return fwd * cf / f, (fwd + bwd) * (cf + cb) / (f + b) - fwd * cf / f

    def activation_bytes(self, what: str, recompute: Optional[str]) -> Optional[float]:
        return self.act_bytes.get(f"{what}/{recompute or 'none'}")

    def link(self, kind: str, default_bw: float, default_lat: float) -> Tuple[float, float]:
        hit = self.links.get(kind)
        return (hit[0], hit[1]) if hit else (default_bw, default_lat)


def _bracket(pts, mbs):
    for a, b in zip(pts, pts[1:]):
        if a[0] <= mbs <= b[0]:
            return a, b
    return pts[0], pts[-1]


def cache_dir() -> str:
    base = os.environ.get("MEGAHET_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "megahet")
    return os.path.join(base, "profiles")


def profile_key(backend: str, model_cfg, dtype: torch.dtype, threads: int, mbs: Sequence[int]) -> str:
    shape = {k: getattr(model_cfg, k) for k in sorted(vars(model_cfg)) if not k.startswith("_")}
    text = json.dumps([backend, shape, str(dtype), threads, list(mbs), torch.__version__], sort_keys=True, default=str)
    return f"{backend}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def load_or_measure(model_cfg, dtype: torch.dtype, *, backend: str = "cpu", threads: Optional[int] = None,
                    micro_batch_sizes: Sequence[int] = (1, 2, 4), vocab_size: int = 32000,
                    progress: Optional[Progress] = None, repeats: int = 3, use_cache: bool = True,
                    min_seconds: float = 0.0) -> Profile:
    """The cached profile of this model shape on `backend`, measuring it on a miss."""
    threads = threads or torch.get_num_threads()
    key = profile_key(backend, model_cfg, dtype, threads, list(micro_batch_sizes))
    path = os.path.join(cache_dir(), key + ".json")
    cached = _read_cache(path) if use_cache else None
    if cached:
        return Profile(**cached)
    prof = measure(model_cfg, dtype, backend=backend, threads=threads, micro_batch_sizes=micro_batch_sizes,
                   vocab_size=vocab_size, progress=progress, repeats=repeats, min_seconds=min_seconds)
    prof.key = key
    _write_cache(path, asdict(prof))
    return prof


def load_or_measure_together(model_cfg, dtype: torch.dtype, speeds: Sequence[float], *,
                             threads: Optional[int] = None, micro_batch_sizes: Sequence[int] = (1, 2, 4),
                             vocab_size: int = 32000, progress: Optional[Progress] = None, repeats: int = 3,
                             use_cache: bool = True, timeout: float = 1800.0,
                             min_seconds: float = 0.3) -> List[Profile]:
    """One profile per rank that will share this host, all measured at the same time, as they will run.

    speeds[i]: 1.0 for a cpu rank, the speed of a sim rank. Ranks on one host slow each other down (here
    mostly by sharing memory bandwidth), and by how much depends on what the others do: a sim rank's
    compute always overlaps a co-runner's, a cpu rank's overlaps a sim rank's only while that one is not
    idling. So each rank measures in its own process, a sim rank idles (1/speed - 1) x each chunk as the
    sim backend does, each timed item starts on every rank at once and repeats (at least `min_seconds`)
    until every rank has its samples, and a sim rank's times include its idling: its effective speed next to
    the others, not speed x an unloaded CPU. Cached under (shape, dtype, threads, micro-batch sizes, all
    speeds, torch version).
    """
    threads = threads or torch.get_num_threads()
    speeds = [float(s) for s in speeds]
    key = profile_key("together", model_cfg, dtype, threads, list(micro_batch_sizes) + [tuple(speeds)])
    path = os.path.join(cache_dir(), key + ".json")
    cached = _read_cache(path) if use_cache else None
    if cached and isinstance(cached, list) and len(cached) == len(speeds):
        return [Profile(**p) for p in cached]
    import multiprocessing as mp
    if mp.current_process().daemon:
        # A daemonic process (e.g. a test's spawned rank) may not start children: measure one after
        # another here, each rank alone, its sim idling included.
        log.warning("megahet: profiling %d co-running ranks one after another (no child processes allowed "
                    "here); contention between them is not measured", len(speeds))
        profs = [measure(model_cfg, dtype, threads=threads, micro_batch_sizes=micro_batch_sizes,
                         vocab_size=vocab_size, repeats=repeats, after_compute=_idler(s), min_seconds=min_seconds)
                 for s in speeds]
        for prof, s in zip(profs, speeds):
            _label_sim(prof, s)
    else:
        from megahet.testing import run_distributed
        profs = run_distributed(_measure_rank, len(speeds), model_cfg, dtype, threads, list(micro_batch_sizes),
                                vocab_size, repeats, speeds, min_seconds, timeout=timeout,
                                env={"MEGAHET_TEST_THREADS": str(threads)})
    if progress:
        progress(1, 1, f"profiled {len(speeds)} co-running ranks")
    for i, prof in enumerate(profs):
        prof.key = f"{key}/{i}"
    _write_cache(path, [asdict(p) for p in profs])
    return profs


def _read_cache(path: str):
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        log.warning("profile cache %s unreadable; measuring again", path)
        return None


def _write_cache(path: str, data) -> None:
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = path + ".partial"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, path)


class _SavedBytes:
    """Peak bytes autograd keeps for backward, deduplicated by storage, parameters excluded."""

    def __init__(self, params):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.seen: Dict[int, int] = {}

    def pack(self, t):
        key = t.untyped_storage().data_ptr()
        if key not in self.params and key not in self.seen:
            self.seen[key] = t.untyped_storage().nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _timed(fn, sync, after_compute=None) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    if after_compute:
        after_compute(time.perf_counter() - t0)
    return time.perf_counter() - t0


def _idler(speed: float) -> Optional[Callable[[float], None]]:
    """What the sim backend does after each compute chunk at `speed` (None for a full-speed rank)."""
    if speed >= 1.0:
        return None
    return lambda elapsed: time.sleep((1.0 / speed - 1.0) * elapsed)


def _label_sim(prof: Profile, speed: float) -> None:
    """A sim rank's profile: its backend, and the simulated device's peak (speed x the CPU's)."""
    if speed < 1.0:
        prof.backend = "sim"
        prof.peak_tflops *= speed


class _Together:
    """Co-running ranks, through a TCPStore they share: each timed item starts on every rank at once and
    runs until every rank has its samples, so the ranks contend as in the job and no rank is ever timed
    alone (every rank measures the same items in the same order)."""

    def __init__(self, store, world: int, min_seconds: float):
        self.store, self.world, self.min_seconds = store, world, min_seconds
        self.item, self.marked = 0, False

    def start(self) -> None:
        # Blocking, not polling: a rank polling the store would load the host its peers are being timed on.
        self.item, self.marked = self.item + 1, False
        if int(self.store.add(f"ready{self.item}", 1)) == self.world:
            self.store.set(f"go{self.item}", "1")
        self.store.wait([f"go{self.item}"])

    def more(self, have_mine: bool) -> bool:
        """After each run of the item: whether to run it again. `have_mine`: this rank has its samples;
        it goes on until every rank has said so."""
        if have_mine and not self.marked:
            self.store.add(f"done{self.item}", 1)
            self.marked = True
        return not (self.marked and int(self.store.add(f"done{self.item}", 0)) >= self.world)


class _TogetherInGroup(_Together):
    """_Together for TP / EP shards: the members of a group call collectives in every run, so they agree
    on each `more` (any member going on keeps the group going)."""

    def __init__(self, store, world: int, min_seconds: float, group, device):
        super().__init__(store, world, min_seconds)
        self.group, self.device = group, device

    def more(self, have_mine: bool) -> bool:
        again = torch.tensor([1.0 if super().more(have_mine) else 0.0], device=self.device)
        self.group.all_reduce(again)
        return again.item() > 0.0


def _measure_rank(model_cfg, dtype, threads, mbs, vocab_size, repeats, speeds, min_seconds=0.3):
    """One of several co-running measurements (a run_distributed child); returns this rank's Profile."""
    from datetime import timedelta

    import torch.distributed as dist
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, rank == 0,
                          timeout=timedelta(seconds=600))
    prof = measure(model_cfg, dtype, threads=threads, micro_batch_sizes=mbs, vocab_size=vocab_size,
                   repeats=repeats, after_compute=_idler(speeds[rank]), together=_Together(store, world, min_seconds))
    _label_sim(prof, speeds[rank])
    store.add("left", 1)
    while rank == 0 and int(store.add("left", 0)) < world:  # rank 0 serves the store: it leaves last
        time.sleep(0.01)
    return prof


def load_or_measure_shards_together(model_cfg, dtype: torch.dtype, speeds: Sequence[float], tp: int, ep: int = 1,
                                    *, sequence_parallel: bool = False, micro_batch_sizes: Sequence[int] = (1, 2, 4),
                                    vocab_size: int = 32000, threads: int = 1, repeats: int = 3,
                                    min_seconds: float = 0.3, use_cache: bool = True, timeout: float = 600.0,
                                    progress: Optional[Progress] = None) -> Optional[List[Dict[str, List[float]]]]:
    """Forward and backward seconds of TP / EP shards, measured with their peers: one dict per local rank,
    keyed by cost_model.shard_key + "/{mbs}" (compute_time takes them for those degrees as they are).
    With tp > 1 and ep 1: the dense layer, the embedding and the head at TP `tp` ("dense@tp2/1", ...), and
    the MoE layer of a MoE model; with ep > 1: only the MoE layer ("moe@ep2/1", "moe@tp2ep2/1"). None
    when there is nothing to shard or the ranks do not split into blocks of tp x ep consecutive ranks of
    one speed each (how the runtime's layout groups them), or ep does not divide the experts.

    Why measured, not derived: a layer's time / tp plus the collectives' link fit missed 20-35% of a TP
    stage here. The shard's smaller matmuls run less efficiently, the parts TP does not split (norms,
    residuals without sequence parallelism) run on every rank, and each collective (a TP layer's four
    all-reduces, a MoE layer's dispatch and combine all-to-alls) waits for the slower peer after compute,
    an EP peer also for its share of the routed tokens. Every local rank runs at once (each group its own
    shard, sim ranks stretched as the runtime stretches them: collectives left out), so the groups
    contend as in the job. Cached under (shape, dtype, threads, micro-batch sizes, speeds, TP, EP,
    sequence parallelism, torch version).
    """
    speeds = [float(s) for s in speeds]
    block = tp * ep
    moe = bool(model_cfg.num_experts)
    if block <= 1 or (ep > 1 and (not moe or model_cfg.num_experts % ep)) or len(speeds) % block \
            or any(len(set(speeds[i:i + block])) != 1 for i in range(0, len(speeds), block)):
        return None
    # TP-only keys are those of the TP-only measurement before EP was added: its caches stay valid.
    key = profile_key("tp" if ep == 1 else "shards", model_cfg, dtype, threads,
                      list(micro_batch_sizes) + [tuple(speeds), tp, bool(sequence_parallel)] + ([ep] if ep > 1 else []))
    path = os.path.join(cache_dir(), key + ".json")
    cached = _read_cache(path) if use_cache else None
    if isinstance(cached, list) and len(cached) == len(speeds):
        return cached
    import multiprocessing as mp
    if mp.current_process().daemon:
        log.warning("megahet: cannot profile TP %d / EP %d shards from a daemonic process; their time is derived "
                    "instead", tp, ep)
        return None
    from megahet.testing import run_distributed
    out = run_distributed(_measure_shard_rank, len(speeds), model_cfg, dtype, speeds, tp, ep, sequence_parallel,
                          list(micro_batch_sizes), vocab_size, threads, repeats, min_seconds, timeout=timeout,
                          env={"MEGAHET_TEST_THREADS": str(threads)})
    if progress:
        progress(1, 1, f"profiled TP {tp} / EP {ep} shards of {len(speeds)} co-running ranks")
    _write_cache(path, out)
    return out


def _measure_shard_rank(model_cfg, dtype, speeds, tp, ep, sequence_parallel, mbs_list, vocab_size, threads, repeats,
                        min_seconds):
    """One rank of load_or_measure_shards_together (a run_distributed child): its TP/EP group's shard of
    each item, every local rank starting it at once, each group repeating it until all local ranks have
    their samples."""
    import torch.distributed as dist
    from megahet.hetero.cost_model import shard_key
    from megahet.models.gpt import GPTModel
    from megahet.models.transformer import TransformerLayer, is_moe_layer, rotary_tables
    from megahet.parallel.context import RankSpec, build_parallel_context, rendezvous_store
    from megahet.parallel.pipeline import compute_timer
    from megahet.tokenizer import padded_vocab_size
    specs = [RankSpec("cpu") if s >= 1.0 else RankSpec("sim", {"speed": s}) for s in speeds]
    world = len(speeds)
    store = rendezvous_store(int(os.environ["RANK"]), world, 120)
    ctx = build_parallel_context(tp=tp, ep=ep, rank_specs=specs, timeout_s=120, store=store)
    torch.set_num_threads(threads)
    cfg = model_cfg
    seq, h = cfg.seq_length, cfg.hidden_size
    sp = sequence_parallel
    s_local = seq // tp if sp else seq
    rope = rotary_tables(cfg.max_position_embeddings or seq, cfg.kv_channels, cfg.rotary_base, ctx.device) \
        if cfg.position_embedding_type == "rope" else None
    layer_ids = {"dense": next((i for i in range(cfg.num_layers) if not is_moe_layer(cfg, i)), None),
                 "moe": next((i for i in range(cfg.num_layers) if is_moe_layer(cfg, i)), None)}
    kinds = [k for k in (["dense"] if ep == 1 else []) + ["moe"] if layer_ids[k] is not None]
    torch.manual_seed(0)
    layers = {k: TransformerLayer(cfg, ctx, layer_ids[k], 1234, sp, dtype, ctx.device, None) for k in kinds}
    if ep == 1:
        padded = padded_vocab_size(vocab_size, cfg.make_vocab_size_divisible_by, tp)
        embed = GPTModel(cfg, ctx, layer_ids=[], pre_process=True, post_process=False, vocab_size=vocab_size,
                         padded_vocab_size=padded, sequence_parallel=sp, dtype=dtype)
        head = GPTModel(cfg, ctx, layer_ids=[], pre_process=False, post_process=True, vocab_size=vocab_size,
                        padded_vocab_size=padded, sequence_parallel=sp, dtype=dtype)
    sync = lambda: ctx.backend.synchronize(ctx.device)  # noqa: E731
    # Every member of a TP or EP group calls its collectives in each run, so they agree on each `more`:
    # the TP group (ep 1), the EP group (tp 1), else every local rank (a superset of the tp x ep block).
    group = ctx.tp_group if ep == 1 else ctx.ep_group if tp == 1 else ctx.world_group
    together = _TogetherInGroup(dist.PrefixStore("megahet/profile-shards", store), world, min_seconds, group, ctx.device)

    def timed(fn):
        return _fwd_bwd(fn, sync, repeats, together=together, wrap=lambda phase: compute_timer(ctx.backend, phase))

    out: Dict[str, List[float]] = {}
    for mbs in mbs_list:
        for kind, layer in layers.items():
            x = torch.randn(s_local, mbs, h, dtype=dtype, device=ctx.device)
            out[f"{shard_key(kind, tp, ep)}/{mbs}"] = timed(lambda x=x, layer=layer: layer(x.requires_grad_(), rope))
        if ep == 1:
            tokens = torch.randint(0, vocab_size, (mbs, seq), device=ctx.device)
            out[f"embed@tp{tp}/{mbs}"] = timed(lambda t=tokens: embed(tokens=t))
            hidden = torch.randn(s_local, mbs, h, dtype=dtype, device=ctx.device)
            out[f"head@tp{tp}/{mbs}"] = timed(lambda x=hidden, t=tokens: head(hidden_states=x.requires_grad_(),
                                                                              labels=t).sum())
    ctx.world_group.barrier()  # nobody leaves while a peer may still call a collective
    return out


def measure(model_cfg, dtype: torch.dtype, *, backend: str = "cpu", threads: int = 1,
            micro_batch_sizes: Sequence[int] = (1, 2, 4), vocab_size: int = 32000,
            progress: Optional[Progress] = None, repeats: int = 3, min_seconds: float = 0.0,
            after_compute: Optional[Callable[[float], None]] = None, together: Optional[_Together] = None) -> Profile:
    """Time and measure the pieces of `model_cfg` (a finalized ModelConfig) on this machine's `backend`.

    after_compute(seconds): called after each timed chunk (a sim rank's idling); the times include it.
    together: co-running ranks that time each item at the same time as this one.
    min_seconds: alone, time each item for at least this long.
    """
    from megahet.models.gpt import GPTModel
    from megahet.models.transformer import TransformerLayer, is_moe_layer, rotary_tables
    from megahet.parallel.context import single_process_context
    from megahet.tokenizer import padded_vocab_size

    ctx = single_process_context(backend)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    sync = lambda: ctx.backend.synchronize(ctx.device)  # noqa: E731
    prof = Profile(backend=backend, key="")
    cfg = model_cfg
    seq, h = cfg.seq_length, cfg.hidden_size
    padded = padded_vocab_size(vocab_size, cfg.make_vocab_size_divisible_by, 1)
    kinds = ["dense"] + (["moe"] if cfg.num_experts else [])
    layer_ids = {"dense": next((i for i in range(cfg.num_layers) if not is_moe_layer(cfg, i)), None),
                 "moe": next((i for i in range(cfg.num_layers) if is_moe_layer(cfg, i)), None)}
    kinds = [k for k in kinds if layer_ids[k] is not None]
    total = len(micro_batch_sizes) * (len(kinds) + 2) + len(kinds) + 1
    done = 0

    def tick(label: str):
        nonlocal done
        done += 1
        if progress:
            progress(done, total, label)

    rope = rotary_tables(cfg.max_position_embeddings or seq, cfg.kv_channels, cfg.rotary_base, ctx.device) \
        if cfg.position_embedding_type == "rope" else None
    torch.manual_seed(0)
    try:
        modules = {k: TransformerLayer(cfg, ctx, layer_ids[k], 1234, False, dtype, ctx.device, None) for k in kinds}
        embed = GPTModel(cfg, ctx, layer_ids=[], pre_process=True, post_process=False, vocab_size=vocab_size,
                         padded_vocab_size=padded, dtype=dtype)
        head = GPTModel(cfg, ctx, layer_ids=[], pre_process=False, post_process=True, vocab_size=vocab_size,
                        padded_vocab_size=padded, dtype=dtype)
        for mbs in micro_batch_sizes:
            for k in kinds:
                layer = modules[k]
                x = torch.randn(seq, mbs, h, dtype=dtype, device=ctx.device)
                prof.times[f"{k}/{mbs}"] = _fwd_bwd(lambda x=x, layer=layer: layer(x.requires_grad_(), rope),
                                                    sync, repeats, after_compute, together, min_seconds=min_seconds)
                tick(f"{k} layer, micro-batch {mbs}")
            tokens = torch.randint(0, vocab_size, (mbs, seq), device=ctx.device)
            prof.times[f"embed/{mbs}"] = _fwd_bwd(lambda t=tokens: embed(tokens=t), sync, repeats, after_compute,
                                                  together, min_seconds=min_seconds)
            tick(f"embedding, micro-batch {mbs}")
            hidden = torch.randn(seq, mbs, h, dtype=dtype, device=ctx.device)
            prof.times[f"head/{mbs}"] = _fwd_bwd(
                lambda x=hidden, t=tokens: head(hidden_states=x.requires_grad_(), labels=t).sum(), sync, repeats,
                after_compute, together, min_seconds=min_seconds)
            tick(f"head + loss, micro-batch {mbs}")
        mbs = micro_batch_sizes[0]
        tokens_n = mbs * seq
        for k in kinds:  # a layer under full recompute, as models/gpt.py runs it (checkpoint, non-reentrant)
            layer = modules[k]
            x = torch.randn(seq, mbs, h, dtype=dtype, device=ctx.device)
            prof.times[f"{k}-recompute/{mbs}"] = _fwd_bwd(
                lambda x=x, layer=layer: checkpoint(lambda t: layer(t, rope), x.requires_grad_(), use_reentrant=False),
                sync, repeats, after_compute, together, min_seconds=min_seconds)
        for k in kinds:
            layer = modules[k]
            for rc in ("none", "selective"):
                layer.self_attention.recompute_core = rc == "selective"
                meter = _SavedBytes(layer.parameters())
                x = torch.randn(seq, mbs, h, dtype=dtype, device=ctx.device, requires_grad=True)
                with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
                    out = layer(x, rope)
                prof.act_bytes[f"{k}/{rc}"] = meter.total / tokens_n
                del out
            layer.self_attention.recompute_core = False
            prof.act_bytes[f"{k}/full"] = h * torch.finfo(dtype).bits / 8  # only the layer input is kept
            tick(f"{k} layer activations")
        meter = _SavedBytes(head.parameters())
        x = torch.randn(seq, mbs, h, dtype=dtype, device=ctx.device, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
            out = head(hidden_states=x, labels=torch.randint(0, vocab_size, (mbs, seq)))
        prof.act_bytes["head/none"] = meter.total / tokens_n
        del out
        prof.optimizer_s_per_param = _adam_seconds_per_param(sync, ctx)
        prof.peak_tflops = ctx.backend.peak_flops(dtype) / 1e12
        tick("optimizer step")
    finally:
        torch.set_num_threads(old_threads)
    return prof


def _fwd_bwd(fn, sync, repeats: int, after_compute=None, together: Optional[_Together] = None,
             min_seconds: float = 0.0, wrap: Optional[Callable] = None) -> List[float]:
    """Median forward and backward seconds of `fn()` (its output backpropagated with a ones gradient),
    each including `after_compute(its compute seconds)` when given (a sim rank's idling). `wrap`: applied
    to each of forward and backward before it is timed (a TP shard: the runtime's compute_timer, which
    stretches a sim rank's compute but not its collectives).

    Alone: one warm-up run and `repeats` timed ones, or more until `min_seconds` have passed (this VM's
    speed drifts by +-15% from one second to the next: a tenth of a second samples one moment).
    Together: started with the co-running ranks, for at least their `min_seconds`, and on until every
    rank has its samples (the median drops the outliers a shared host gives a few runs)."""
    fwds, bwds = [], []
    wrap = wrap or (lambda phase: phase)
    if together:
        together.start()
    t0, i = time.perf_counter(), 0
    while True:
        out = None

        def forward():
            nonlocal out
            out = fn()

        f = _timed(wrap(forward), sync, after_compute)
        grad = torch.ones_like(out)
        b = _timed(wrap(lambda: out.backward(grad)), sync, after_compute)
        if i:  # the first run warms up
            fwds.append(f)
            bwds.append(b)
        i += 1
        enough = i > repeats
        if together is None:
            if enough and time.perf_counter() - t0 >= min_seconds:
                break
        elif not together.more(enough and time.perf_counter() - t0 >= together.min_seconds):
            break
    return [statistics.median(fwds), statistics.median(bwds)]


def _adam_seconds_per_param(sync, ctx, n: int = 2_000_000, pieces: int = 8) -> float:
    """Seconds per parameter of the runtime's optimizer step (training/optimizer.py): the job-wide
    gradient norm and clipping (training/grad_norm.py) and AdamW with the kernel
    --optimizer-implementation auto picks on this device, over `pieces` tensors as a model has many."""
    from megahet.training.grad_norm import clip_grads, global_grad_norm
    from megahet.training.optimizer import optimizer_flags
    params = [torch.nn.Parameter(torch.randn(n // pieces)) for _ in range(pieces)]
    for p in params:
        p.grad = torch.randn(n // pieces)
    opt = torch.optim.AdamW(params, lr=1e-4, **optimizer_flags("auto", params[0].device))
    grads = [p.grad for p in params]

    def step():
        clip_grads(grads, 1.0, global_grad_norm(params, ctx, grads))
        opt.step()

    step()
    runs = [_timed(step, sync) for _ in range(3)]
    return statistics.median(runs) / n


# Ring formulas of cost_model at 2 ranks: time = steps x latency + share x bytes / bandwidth, where bytes
# is what the formula takes (all-reduce: the tensor; all-gather / reduce-scatter: the full tensor;
# all-to-all: everything one rank sends; p2p: one pipeline message, its shape header included).
_TWO_RANKS = {"p2p": (1, 1.0), "all_reduce": (2, 1.0), "all_gather": (1, 0.5), "reduce_scatter": (1, 0.5),
              "all_to_all": (1, 0.5)}


def measure_links(sizes: Sequence[int] = (1 << 12, 1 << 16, 1 << 18, 1 << 20, 1 << 23), repeats: int = 20,
                  timeout: float = 300.0, threads: int = 1) -> Dict[str, List[float]]:
    """Bandwidth and latency of gloo between two local processes (the intra-node CPU link and, host
    staged, the bridge between a cpu and a sim domain), fitted by message size for a pipeline message
    ("intra_node", "cross_domain") and for each collective the runtime issues ("intra_node/all_reduce",
    ...), in the terms of cost_model's ring formulas (cost_model.Links.params).

    Each message is timed as a training step meets it: right after a few milliseconds of compute on
    both ranks, averaged (not the median: a step pays every slow one). Back to back on idle ranks a
    4 KB all-reduce takes ~0.35 ms here; after compute it takes ~2 ms on average (the peer arrives
    later, gloo's threads must be woken and scheduled), which is what a TP layer's four all-reduces
    per micro-batch cost in a real step. `threads`: each rank's thread count (the compute between
    messages runs with it).
    """
    from megahet.testing import run_distributed
    res = run_distributed(_link_times, 2, list(sizes), repeats, timeout=timeout,
                          env={"MEGAHET_TEST_THREADS": str(threads)})
    out: Dict[str, List[float]] = {}
    for op, points in res[0].items():
        steps, share = _TWO_RANKS[op]
        bw, lat = fit_link(points)
        figures = [bw * share, lat / steps]
        for kind in ("intra_node", "cross_domain"):
            out[kind if op == "p2p" else f"{kind}/{op}"] = figures
    return out


def fit_link(points: Sequence[Tuple[int, float]]) -> Tuple[float, float]:
    """Fit t = latency + bytes / bandwidth over (bytes, seconds) points, minimising the relative error
    (weights 1/t^2): sizes from 4 KB to 8 MB differ 1000x in time, and a plain least-squares fit would
    follow the largest and leave the small messages' latency (most of a step's messages) to chance."""
    w = [1.0 / max(t, 1e-9) ** 2 for _, t in points]
    sw = sum(w)
    mx = sum(wi * b for wi, (b, _) in zip(w, points)) / sw
    my = sum(wi * t for wi, (_, t) in zip(w, points)) / sw
    sxx = sum(wi * (b - mx) ** 2 for wi, (b, _) in zip(w, points))
    slope = sum(wi * (b - mx) * (t - my) for wi, (b, t) in zip(w, points)) / sxx if sxx else 0.0
    lat = max(my - slope * mx, 0.0)
    bw = 1.0 / slope if slope > 0 else float("inf")
    return bw, lat


def _link_times(sizes, repeats):
    """(bytes, seconds) per size of a pipeline message (shape header + data, one way) and of each
    collective, on this rank (a run_distributed child of 2 ranks)."""
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from megahet.parallel.comm import _ALL_GATHER, _REDUCE_SCATTER
    header = torch.zeros(10, dtype=torch.int64)
    a, w = torch.randn(256, 512), torch.randn(512, 512)

    def message(buf):  # as boundary.StageP2P: the shape header, then the data, waited on together
        if rank == 0:
            for work in [dist.isend(header, 1, tag=0), dist.isend(buf, 1, tag=1)]:
                work.wait()
            for work in [dist.irecv(header, 1, tag=0), dist.irecv(buf, 1, tag=1)]:
                work.wait()
        else:
            for work in [dist.irecv(header, 0, tag=0), dist.irecv(buf, 0, tag=1)]:
                work.wait()
            for work in [dist.isend(header, 0, tag=0), dist.isend(buf, 0, tag=1)]:
                work.wait()

    out: Dict[str, List[Tuple[int, float]]] = {op: [] for op in _TWO_RANKS}
    for size in sizes:
        n = max(size // 4, 2) // 2 * 2  # fp32 elements, even so the halves split evenly
        buf, half = torch.zeros(n), torch.zeros(n // 2)
        runs = {"p2p": (lambda: message(buf), 2),
                "all_reduce": (lambda: dist.all_reduce(buf), 1),
                "all_gather": (lambda: _ALL_GATHER(buf, half), 1),
                "reduce_scatter": (lambda: _REDUCE_SCATTER(half, buf), 1),
                "all_to_all": (lambda: dist.all_to_all_single(torch.empty_like(buf), buf), 1)}
        for op, (fn, trips) in runs.items():
            times = []
            dist.barrier()
            for i in range(repeats + 1):
                for _ in range(4):  # ~1-5 ms of compute, as between a layer's collectives
                    a @ w
                t0 = time.perf_counter()
                fn()
                if i:  # the first run warms up
                    times.append((time.perf_counter() - t0) / trips)
            out[op].append((n * 4, statistics.mean(times)))
    return out


# -- links at job start -------------------------------------------------------------------------------
# What auto-planning measures (load_or_measure_links): the benchmark's range of sizes less its 256 KB
# point, 10 timed runs each instead of 20. Every timed run follows a few ms of compute, so the
# benchmark's 5 sizes x 21 runs x 5 messages took 5-12 s here (two processes started included); these
# take 2.6-3.5 s, once per torch version, thread count and local world size. Four sizes still span a
# step's messages (4 KB scalars and small TP / pipeline messages up to 8 MB gradient buckets) for the
# two-parameter fit, and the mean of 10 runs after compute keeps the slow wake-ups a step pays; on
# this shared machine the figures of two runs differ about as much as two of the benchmark's.
JOB_LINK_SIZES = (1 << 12, 1 << 16, 1 << 20, 1 << 23)
JOB_LINK_REPEATS = 10
LINKS_RETRY_S = 600.0  # a failed measurement stands for the other ranks of one job start, not for later jobs


def links_key(threads: int, world: int, sizes: Sequence[int], repeats: int) -> str:
    text = json.dumps([threads, world, list(sizes), repeats, torch.__version__])
    return f"links-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def load_or_measure_links(world: int, threads: int, *, sizes: Sequence[int] = JOB_LINK_SIZES,
                          repeats: int = JOB_LINK_REPEATS, progress: Optional[Progress] = None,
                          use_cache: bool = True) -> Dict[str, List[float]]:
    """measure_links' figures for a job of `world` local ranks with `threads` threads each, cached under
    cache_dir() so planning again is free; {} (the cost model's defaults) when they cannot be measured.

    A daemonic process (a test's spawned rank) may not start the two measuring processes: it takes the
    cached figures if there are any, else the defaults, with a warning (as load_or_measure_together
    falls back). A failed measurement is cached as failed for LINKS_RETRY_S, so the other local ranks
    of that job start plan with the same (default) figures rather than measuring again and perhaps
    succeeding; a later job measures again.
    """
    path = os.path.join(cache_dir(), links_key(threads, world, sizes, repeats) + ".json")
    cached = _read_cache(path) if use_cache else None
    if isinstance(cached, dict) and "failed" in cached and time.time() - cached.get("at", 0.0) < LINKS_RETRY_S:
        log.warning("megahet: gloo links not measured (%s); planning with the cluster spec's links or cost_model's "
                    "defaults", cached["failed"])
        return {}
    if isinstance(cached, dict) and "failed" in cached:
        cached = None
    if isinstance(cached, dict) and cached:
        return {k: [float(x) for x in v] for k, v in cached.items()}
    import multiprocessing as mp
    if mp.current_process().daemon:
        log.warning("megahet: gloo links not measured (no child processes allowed here, no cached figures in "
                    "%s); planning with the cluster spec's links or cost_model's defaults", cache_dir())
        return {}
    if progress:
        progress(0, 1, "links: gloo between 2 ranks")
    try:
        out = measure_links(sizes, repeats, timeout=60.0, threads=threads)
    except (RuntimeError, OSError) as exc:  # testing.DistributedTestError is a RuntimeError
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
        _write_cache(path, {"failed": why, "at": time.time()})
        return load_or_measure_links(world, threads, sizes=sizes, repeats=repeats)
    if progress:
        progress(1, 1, "links: gloo between 2 ranks")
    _write_cache(path, out)
    return out
