"""ParallelContext: this rank's backend, coordinates and process groups, built once and passed in.

Built from a Plan (megahet.hetero.plan): pipelines (data-parallel replicas) x stages, each stage of
each pipeline served by its own TP ranks. Uniform flags give the uniform plan, whose rank order is
tensor parallel fastest, then data parallel, then pipeline:
    rank = tp_rank + tp * (dp_rank + dp * pp_rank)
so a tensor-parallel group is a block of consecutive ranks (one node, one vendor). Experts reuse the
data-parallel ranks of a stage: `ep` consecutive pipelines form an expert-parallel group and the
`dp // ep` pipelines holding the same experts form the expert-data-parallel group.

Every rank may run a different backend (a cluster spec assigns them). Groups whose members share a
communication domain use the native library; data-parallel groups that span domains reduce
hierarchically (hierarchical.py); pipeline messages go per link, bridged only across domains
(links.py, boundary.py).
"""
from __future__ import annotations

import datetime
import logging
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megahet.device import Backend, default_backend_name, get_backend
from megahet.errors import MegahetError
from megahet.parallel.comm import CommGroup, make_group
from megahet.parallel.hierarchical import HierarchicalGroup
from megahet.parallel.heartbeat import Progress, beat_interval, heartbeat_store
from megahet.parallel.link_throttle import SiteThrottle, scalar_collective_delay
from megahet.parallel.links import LinkCounters, Links

if TYPE_CHECKING:
    from megahet.hetero.plan import Plan

log = logging.getLogger("megahet")


@dataclass
class RankSpec:
    """The backend a global rank runs (name + options), e.g. ("sim", {"speed": 0.5})."""
    backend: str = "cpu"
    options: Dict = field(default_factory=dict)


@dataclass
class ParallelContext:
    """Everything a rank needs to know about the parallel layout. No process-group globals.

    Built from a Plan (megahet.hetero.plan): `tp` is this rank's stage's TP degree (stages may
    differ), `dp` the number of pipelines (replicas), `pp` the number of stages.
    """
    rank: int
    world_size: int
    local_rank: int
    backend: Backend
    device: torch.device
    tp: int
    pp: int
    dp: int
    ep: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    expert_dp_rank: int
    tp_group: CommGroup
    pp_group: Optional[CommGroup]  # only when every stage has the same TP degree; pipelines use `links`
    dp_group: CommGroup
    ep_group: CommGroup
    expert_dp_group: CommGroup
    embedding_group: CommGroup
    world_group: CommGroup
    rank_domains: List[str]
    plan: Optional[Plan] = None
    assignment: List[List[List[int]]] = field(default_factory=list)  # [pipeline][stage] -> global ranks
    links: Optional[Links] = None
    counters: LinkCounters = field(default_factory=LinkCounters)
    progress: Optional[Progress] = None  # step + collective counts, published on a heartbeat (timeout errors)
    cluster: Optional[object] = None  # the ClusterSpec the plan runs on (for logs)

    @property
    def kernels(self):
        return self.backend.kernels

    @property
    def expert_dp(self) -> int:
        return self.dp // self.ep

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def stage_ranks(self) -> List[List[int]]:
        """Global ranks of every stage of this rank's pipeline."""
        return self.assignment[self.dp_rank]

    @property
    def stage_tp(self) -> List[int]:
        """TP degree of every stage (the same in every pipeline)."""
        return [len(r) for r in self.assignment[0]]

    @property
    def vocab_tp(self) -> int:
        """What the vocabulary is padded for: a multiple of every stage's TP degree (lcm)."""
        return math.lcm(*self.stage_tp)

    def global_rank(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return self.assignment[dp_rank][pp_rank][tp_rank]

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size} backend={self.backend.name} device={self.device} "
                f"tp={self.tp_rank}/{self.tp} pp={self.pp_rank}/{self.pp} dp={self.dp_rank}/{self.dp} "
                f"ep={self.ep_rank}/{self.ep}")


def grid_rank(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int) -> int:
    return tp_rank + tp * (dp_rank + dp * pp_rank)


def plan_groups(assignment: List[List[List[int]]], ep: int = 1) -> Dict[str, List[List[int]]]:
    """Every group of every kind from a rank assignment [pipeline][stage] -> ranks (pure).

    tp: the ranks of one stage of one pipeline; dp: TP rank t of stage k in every pipeline; ep:
    `ep` consecutive pipelines at a stage; expert_dp: the pipelines holding the same experts;
    pp (only when all stages share one TP degree): TP rank t of every stage of one pipeline;
    embedding: TP rank t of the first and the last stage (same TP degree there; otherwise the tied
    embedding is re-sliced through the links, see grad_sync.py).
    """
    dp, pp = len(assignment), len(assignment[0])
    tps = [len(r) for r in assignment[0]]
    if dp % ep:
        raise MegahetError(f"{dp} data-parallel replicas are not divisible by --expert-model-parallel-size {ep}")
    groups: Dict[str, List[List[int]]] = {k: [] for k in ("tp", "dp", "pp", "ep", "expert_dp", "embedding")}
    # Lists are sorted: torch orders a group's members by global rank, and so must our group ranks.
    for k in range(pp):
        for d in range(dp):
            groups["tp"].append(sorted(assignment[d][k]))
        for t in range(tps[k]):
            groups["dp"].append(sorted(assignment[d][k][t] for d in range(dp)))
            blocks = [sorted(assignment[e0 + e][k][t] for e in range(ep)) for e0 in range(0, dp, ep)]
            groups["ep"] += blocks
            for e in range(ep):  # the members holding the same experts (same place in their EP group)
                groups["expert_dp"].append(sorted(b[e] for b in blocks))
    for d in range(dp):
        if len(set(tps)) == 1:
            for t in range(tps[0]):
                groups["pp"].append([assignment[d][k][t] for k in range(pp)])
        if tps[0] == tps[-1]:
            for t in range(tps[0]):
                groups["embedding"].append(sorted({assignment[d][0][t], assignment[d][-1][t]}))
    return groups


def grid_groups(world_size: int, tp: int, pp: int, ep: int) -> Dict[str, List[List[int]]]:
    """Every group of every kind of the uniform grid, as lists of global ranks (pure)."""
    if world_size % (tp * pp):
        raise MegahetError(f"world size {world_size} is not divisible by tensor ({tp}) x pipeline ({pp}) parallel; "
                           f"change --tensor-model-parallel-size/--pipeline-model-parallel-size or the rank count")
    dp = world_size // (tp * pp)
    if dp % ep:
        raise MegahetError(f"data-parallel size {dp} is not divisible by --expert-model-parallel-size {ep}")
    return plan_groups(uniform_assignment(tp, pp, dp), ep)


def uniform_assignment(tp: int, pp: int, dp: int) -> List[List[List[int]]]:
    return [[[grid_rank(t, d, p, tp, dp) for t in range(tp)] for p in range(pp)] for d in range(dp)]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def _restart_store(rank: int, world_size: int, timeout: datetime.timedelta):
    """The rendezvous store for this attempt of a torchrun job, or None for the default (env://).

    Why: after torchrun restarts the workers (`--max-restarts`), the agent's store can still hold the
    killed generation's gloo addresses under the same keys; a new rank that reads one before its peer
    overwrites it connects to a dead port ("Connection refused") and the restart fails again. Keys are
    prefixed with the restart count, so every generation meets only its own peers.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"megahet/attempt_{restart}", store)


def rendezvous_store(rank: int, world_size: int, timeout_s: float):
    """A store every rank of this job (this torchrun attempt) shares, before the process groups exist.

    Why: --elastic ranks agree on which device groups survived before the plan (and so the process
    groups) can be built. Under torchrun it is the agent's store (keys prefixed by the attempt, as in
    `_restart_store`); otherwise rank 0 serves one at MASTER_ADDR:MASTER_PORT (as env:// would).
    Pass it on to `build_parallel_context(store=...)`, which initialises torch.distributed with it.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    store = _restart_store(rank, world_size, timeout)
    if store is not None:
        return store
    try:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError):
        raise MegahetError("--elastic with several ranks needs the torchrun environment (MASTER_ADDR, MASTER_PORT); "
                           "launch with torchrun") from None
    return dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)


def build_parallel_context(tp: int = 1, pp: int = 1, ep: int = 1, *,
                           rank_specs: Optional[Sequence[RankSpec]] = None,
                           backend_name: Optional[str] = None,
                           timeout_s: float = 600.0,
                           plan: Optional[Plan] = None,
                           assignment: Optional[List[List[List[int]]]] = None,
                           link_throttle: Optional[Sequence[Sequence[object]]] = None,
                           rank_sites: Optional[Sequence[Optional[str]]] = None,
                           store=None) -> ParallelContext:
    """Initialise torch.distributed from the torchrun environment (if not yet) and build the groups.

    Args:
        tp, pp, ep: uniform tensor, pipeline and expert parallel degrees (dp is what remains); used
            only without `plan`, to build the uniform plan's rank assignment.
        rank_specs: the backend of every global rank (from a cluster spec); default: every rank runs
            `backend_name` or the best available backend.
        timeout_s: collective timeout, so a hung collective fails instead of blocking forever.
        plan: a validated Plan (stages with their own TP degree, pipelines with their own
            micro-batches); `assignment` is its rank_assignment (validate() returns it).
        link_throttle: table[src][dst] of link_throttle.LinkThrottle (or None) between global ranks on
            different simulated sites (link_throttle.site_throttles); pipeline messages and the
            hierarchical reductions' cross-domain exchange then take the link's time.
        rank_sites: the site (data centre) of every global rank, or None. When ranks sit on several
            sites, each (domain, site) is its own part of the topology: reductions are hierarchical by
            site too (inside a site natively, only shards across), and messages between sites go
            through the host-staged bridge (over which `link_throttle` simulates the link), even
            between ranks of one vendor.
        store: the rendezvous store to initialise torch.distributed with (`rendezvous_store`);
            default: torchrun's (or env://).
    """
    world_size = dist.get_world_size() if dist.is_initialized() else _env_int("WORLD_SIZE", 1)
    rank = dist.get_rank() if dist.is_initialized() else _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if rank_specs is None:
        name = backend_name or default_backend_name()
        rank_specs = [RankSpec(name)] * world_size
    if len(rank_specs) != world_size:
        raise MegahetError(f"the cluster spec describes {len(rank_specs)} ranks but {world_size} were launched; "
                           f"launch {len(rank_specs)} ranks (torchrun --nproc-per-node) or fix the cluster file")
    backends = [get_backend(s.backend, **s.options) for s in rank_specs]
    backend = backends[rank]
    ok, why = backend.is_available()
    if not ok:
        raise MegahetError(f"rank {rank} was assigned backend '{backend.name}', which is not available here: {why}")
    domains = [b.domain for b in backends]
    parts = topology_parts(domains, rank_sites)  # what the bridge and hierarchical reductions split by
    libraries = [b.collective_backend for b in backends]
    device = backend.device(local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)

    if plan is None:
        groups = grid_groups(world_size, tp, pp, ep)
        assignment = uniform_assignment(tp, pp, world_size // (tp * pp))
    else:
        if assignment is None:
            raise ValueError("build_parallel_context(plan=...) needs the plan's rank assignment (plan.validate())")
        ep = plan.expert_parallel
        groups = plan_groups(assignment, ep)
    for kind, what in (("tp", "tensor"), ("ep", "expert")):
        for ranks in groups[kind]:
            spanned = sorted({domains[r] for r in ranks})
            if len(spanned) > 1:
                raise MegahetError(f"{what}-parallel group {ranks} spans communication domains {spanned}; "
                                   f"{kind.upper()} groups must stay inside one vendor: reorder the cluster groups "
                                   f"or lower --{what}-model-parallel-size")

    if world_size > 1 and not dist.is_initialized():
        lib = libraries[rank]
        # Mixed domains talk through gloo only; one native domain also gets gloo for host tensors.
        pg_backend = "gloo" if (lib == "gloo" or len(set(domains)) > 1) else f"cpu:gloo,{backend.device_type}:{lib}"
        dist.init_process_group(backend=pg_backend, rank=rank, world_size=world_size, timeout=timeout,
                                store=store if store is not None else _restart_store(rank, world_size, timeout))

    counters = LinkCounters()
    throttle = SiteThrottle(rank, link_throttle) if link_throttle is not None and world_size > 1 else None
    made: Dict[Tuple[str, Tuple[int, ...]], Optional[CommGroup]] = {}
    mine: Dict[str, CommGroup] = {}
    for kind, lists in groups.items():  # every rank walks the same lists in the same order
        for ranks in lists:
            hierarchical = kind in ("dp", "expert_dp")
            key = ("h" if hierarchical else "", tuple(ranks))
            if key not in made:
                made[key] = (_make(ranks, rank, parts if hierarchical else domains, libraries, timeout,
                                   f"{kind}{list(ranks)}", device, counters, hierarchical, throttle,
                                   backend.unreducible_dtypes)
                             if len(ranks) > 1 else None)
            if rank in ranks:
                group = made[key] or CommGroup(ranks, rank, name=f"{kind}{list(ranks)}", device=device)
                mine[kind] = group
    # Middle pipeline stages hold no embedding: their embedding group is themselves alone.
    mine.setdefault("embedding", CommGroup([rank], rank, name="embedding", device=device))
    world_bridged = len(set(domains)) > 1
    world = CommGroup(list(range(world_size)), rank,
                      pg=dist.group.WORLD if world_size > 1 else None, bridged=world_bridged,
                      library="gloo" if world_bridged else libraries[rank], name="world", device=device,
                      unreducible_dtypes=backend.unreducible_dtypes)
    # The world group's job-wide scalars (norms, flags, losses) are not counted: counters show links.
    # On simulated sites they cross the slow link (the bridge's throttle covers only point-to-point).
    if throttle is not None:
        world.link_delay = scalar_collective_delay(link_throttle, world_size)
    links = Links(rank, parts, libraries, device, timeout, counters, throttle=throttle)
    where = [(d, k, t) for d, row in enumerate(assignment) for k, ranks in enumerate(row)
             for t, r in enumerate(ranks) if r == rank]
    if len(where) != 1:
        raise MegahetError(f"rank {rank} serves {len(where)} stages of the plan; every rank serves exactly one")
    dp_rank, pp_rank, tp_rank = where[0]
    ep_rank, expert_dp_rank = mine["ep"].rank, mine["expert_dp"].rank  # places in the (sorted) groups
    ctx = ParallelContext(
        rank=rank, world_size=world_size, local_rank=local_rank, backend=backend, device=device,
        tp=len(assignment[dp_rank][pp_rank]), pp=len(assignment[0]), dp=len(assignment), ep=ep,
        tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank, ep_rank=ep_rank, expert_dp_rank=expert_dp_rank,
        tp_group=mine["tp"], pp_group=mine.get("pp"), dp_group=mine["dp"], ep_group=mine["ep"],
        expert_dp_group=mine["expert_dp"], embedding_group=mine["embedding"],
        world_group=world, rank_domains=domains, plan=plan, assignment=assignment, links=links, counters=counters)
    # Timeout errors name the ranks that never arrived: every group counts its calls, a thread publishes.
    progress = Progress(rank, heartbeat_store(rank, timeout_s) if world_size > 1 else None,
                        beat_interval(timeout_s, world_size))
    for group in [*mine.values(), world]:
        group.progress = progress
        if isinstance(group, HierarchicalGroup):
            group.sub.progress = progress
    links.progress = progress
    progress.start()
    ctx.progress = progress
    log.debug("built %s", ctx.describe())
    return ctx


def close_distributed() -> None:
    """Destroy the default process group and every group made from it: a finished job's last act
    (examples/pretrain_gpt.py), as PyTorch asks of every application on a normal exit (NCCL/HCCL groups
    otherwise warn and may leave work pending; gloo's threads are otherwise torn down with the
    interpreter). Call it only after success: destroying while a peer may still be in a collective can
    hang."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def topology_parts(domains: Sequence[str], rank_sites: Optional[Sequence[Optional[str]]]) -> List[str]:
    """Each rank's part of the topology: its domain, or "domain@site" when the ranks span several sites."""
    if not rank_sites or len({s or "" for s in rank_sites}) < 2:
        return list(domains)
    if len(rank_sites) != len(domains):
        raise MegahetError(f"{len(rank_sites)} rank sites for {len(domains)} ranks; give every rank's site")
    return [f"{d}@{s or ''}" for d, s in zip(domains, rank_sites)]


def _make(ranks, rank, domains, libraries, timeout, name, device, counters, hierarchical, throttle=None,
          unreducible_dtypes: frozenset = frozenset()):
    """A native group, a bridged group, or (for reductions over several domains) a hierarchical one."""
    spanned = list(dict.fromkeys(domains[r] for r in ranks))
    if not hierarchical or len(spanned) == 1:
        group = make_group(ranks, rank, domains, libraries, timeout, name=name, device=device,
                           unreducible_dtypes=unreducible_dtypes)
        if group is not None:
            group.counters = counters
        return group
    pg = dist.new_group(ranks=list(ranks), backend="gloo", timeout=timeout)
    subs = {}
    for d in spanned:  # every rank creates every domain's subgroup, in the same order
        members = [r for r in ranks if domains[r] == d]
        lib = libraries[members[0]]
        sub_pg = dist.new_group(ranks=members, backend=lib, timeout=timeout) if len(members) > 1 else None
        subs[d] = (sub_pg, lib)
    if rank not in ranks:
        return None
    return HierarchicalGroup(ranks, rank, pg, domains, subs, name=name, device=device, counters=counters,
                             throttle=throttle, unreducible_dtypes=unreducible_dtypes)


def single_process_context(backend_name: str = "cpu", **options) -> ParallelContext:
    """A one-rank context without torch.distributed (evaluation, conversion, reference runs)."""
    backend = get_backend(backend_name, **options)
    device = backend.device(0)
    one = lambda n: CommGroup([0], 0, name=n, device=device)  # noqa: E731
    return ParallelContext(rank=0, world_size=1, local_rank=0, backend=backend, device=device,
                           tp=1, pp=1, dp=1, ep=1, tp_rank=0, pp_rank=0, dp_rank=0, ep_rank=0, expert_dp_rank=0,
                           tp_group=one("tp"), pp_group=one("pp"), dp_group=one("dp"), ep_group=one("ep"),
                           expert_dp_group=one("expert_dp"), embedding_group=one("embedding"),
                           world_group=one("world"), rank_domains=[backend.domain], assignment=[[[0]]])
