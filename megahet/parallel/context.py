"""ParallelContext: this rank's backend, coordinates and process groups, built once and passed in.

Rank order: tensor parallel fastest, then data parallel, then pipeline:
    rank = tp_rank + tp * (dp_rank + dp * pp_rank)
so a tensor-parallel group is a block of consecutive ranks (one node, one vendor). Experts reuse the
data-parallel ranks of a stage: `ep` consecutive dp ranks form an expert-parallel group and the
`dp // ep` ranks holding the same experts form the expert-data-parallel group.

Every rank may run a different backend (a cluster spec assigns them); groups whose members share a
communication domain use the native library, the rest go through the bridge (see comm.py).
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megahet.device import Backend, default_backend_name, get_backend
from megahet.errors import MegahetError
from megahet.parallel.comm import CommGroup, make_group

log = logging.getLogger("megahet")


@dataclass
class RankSpec:
    """The backend a global rank runs (name + options), e.g. ("sim", {"speed": 0.5})."""
    backend: str = "cpu"
    options: Dict = field(default_factory=dict)


@dataclass
class ParallelContext:
    """Everything a rank needs to know about the parallel layout. No process-group globals."""
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
    pp_group: CommGroup
    dp_group: CommGroup
    ep_group: CommGroup
    expert_dp_group: CommGroup
    embedding_group: CommGroup
    world_group: CommGroup
    rank_domains: List[str]

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

    def global_rank(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return grid_rank(tp_rank, dp_rank, pp_rank, self.tp, self.dp)

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size} backend={self.backend.name} device={self.device} "
                f"tp={self.tp_rank}/{self.tp} pp={self.pp_rank}/{self.pp} dp={self.dp_rank}/{self.dp} "
                f"ep={self.ep_rank}/{self.ep}")


def grid_rank(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int) -> int:
    return tp_rank + tp * (dp_rank + dp * pp_rank)


def grid_groups(world_size: int, tp: int, pp: int, ep: int) -> Dict[str, List[List[int]]]:
    """Every group of every kind, as lists of global ranks (pure: testable without processes)."""
    if world_size % (tp * pp):
        raise MegahetError(f"world size {world_size} is not divisible by tensor ({tp}) x pipeline ({pp}) parallel; "
                           f"change --tensor-model-parallel-size/--pipeline-model-parallel-size or the rank count")
    dp = world_size // (tp * pp)
    if dp % ep:
        raise MegahetError(f"data-parallel size {dp} is not divisible by --expert-model-parallel-size {ep}")
    g = lambda t, d, p: grid_rank(t, d, p, tp, dp)  # noqa: E731
    groups: Dict[str, List[List[int]]] = {k: [] for k in ("tp", "dp", "pp", "ep", "expert_dp", "embedding")}
    for p in range(pp):
        for d in range(dp):
            groups["tp"].append([g(t, d, p) for t in range(tp)])
        for t in range(tp):
            groups["dp"].append([g(t, d, p) for d in range(dp)])
            for e0 in range(0, dp, ep):
                groups["ep"].append([g(t, e0 + e, p) for e in range(ep)])
            for e in range(ep):
                groups["expert_dp"].append([g(t, d, p) for d in range(e, dp, ep)])
    for d in range(dp):
        for t in range(tp):
            stages = [g(t, d, p) for p in range(pp)]
            groups["pp"].append(stages)
            groups["embedding"].append(sorted({stages[0], stages[-1]}))
    return groups


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def build_parallel_context(tp: int = 1, pp: int = 1, ep: int = 1, *,
                           rank_specs: Optional[Sequence[RankSpec]] = None,
                           backend_name: Optional[str] = None,
                           timeout_s: float = 600.0) -> ParallelContext:
    """Initialise torch.distributed from the torchrun environment (if not yet) and build the groups.

    Args:
        tp, pp, ep: tensor, pipeline and expert parallel degrees (dp is what remains).
        rank_specs: the backend of every global rank (from a cluster spec); default: every rank runs
            `backend_name` or the best available backend.
        timeout_s: collective timeout, so a hung collective fails instead of blocking forever.
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
    libraries = [b.collective_backend for b in backends]
    device = backend.device(local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)

    if world_size > 1 and not dist.is_initialized():
        lib = libraries[rank]
        # Mixed domains talk through gloo only; one native domain also gets gloo for host tensors.
        pg_backend = "gloo" if (lib == "gloo" or len(set(domains)) > 1) else f"cpu:gloo,{backend.device_type}:{lib}"
        dist.init_process_group(backend=pg_backend, rank=rank, world_size=world_size, timeout=timeout)

    groups = grid_groups(world_size, tp, pp, ep)
    dp = world_size // (tp * pp)
    for kind, what in (("tp", "tensor"), ("ep", "expert")):
        for ranks in groups[kind]:
            spanned = sorted({domains[r] for r in ranks})
            if len(spanned) > 1:
                raise MegahetError(f"{what}-parallel group {ranks} spans communication domains {spanned}; "
                                   f"{kind.upper()} groups must stay inside one vendor: reorder the cluster groups "
                                   f"or lower --{what}-model-parallel-size")
    made: Dict[Tuple[int, ...], Optional[CommGroup]] = {}
    mine: Dict[str, CommGroup] = {}
    for kind, lists in groups.items():  # every rank walks the same lists in the same order
        for ranks in lists:
            key = tuple(ranks)
            if key not in made:
                made[key] = (make_group(ranks, rank, domains, libraries, timeout, name=f"{kind}{list(ranks)}",
                                        device=device)
                             if len(ranks) > 1 else None)
            if rank in ranks:
                group = made[key] or CommGroup(ranks, rank, name=f"{kind}{list(ranks)}", device=device)
                mine[kind] = group
    # Middle pipeline stages hold no embedding: their embedding group is themselves alone.
    mine.setdefault("embedding", CommGroup([rank], rank, name="embedding", device=device))
    world_bridged = len(set(domains)) > 1
    world = CommGroup(list(range(world_size)), rank,
                      pg=dist.group.WORLD if world_size > 1 else None, bridged=world_bridged,
                      library="gloo" if world_bridged else libraries[rank], name="world", device=device)
    tp_rank = rank % tp
    dp_rank = (rank // tp) % dp
    pp_rank = rank // (tp * dp)
    ctx = ParallelContext(
        rank=rank, world_size=world_size, local_rank=local_rank, backend=backend, device=device,
        tp=tp, pp=pp, dp=dp, ep=ep, tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank,
        ep_rank=dp_rank % ep, expert_dp_rank=dp_rank // ep,
        tp_group=mine["tp"], pp_group=mine["pp"], dp_group=mine["dp"], ep_group=mine["ep"],
        expert_dp_group=mine["expert_dp"], embedding_group=mine["embedding"],
        world_group=world, rank_domains=domains)
    log.debug("built %s", ctx.describe())
    return ctx


def single_process_context(backend_name: str = "cpu", **options) -> ParallelContext:
    """A one-rank context without torch.distributed (evaluation, conversion, reference runs)."""
    backend = get_backend(backend_name, **options)
    device = backend.device(0)
    one = lambda n: CommGroup([0], 0, name=n, device=device)  # noqa: E731
    return ParallelContext(rank=0, world_size=1, local_rank=0, backend=backend, device=device,
                           tp=1, pp=1, dp=1, ep=1, tp_rank=0, pp_rank=0, dp_rank=0, ep_rank=0, expert_dp_rank=0,
                           tp_group=one("tp"), pp_group=one("pp"), dp_group=one("dp"), ep_group=one("ep"),
                           expert_dp_group=one("expert_dp"), embedding_group=one("embedding"),
                           world_group=one("world"), rank_domains=[backend.domain])
