"""Elastic re-plan (--elastic): after losing devices, run on the groups that are left, re-planned.

Why: a long run loses whole device groups (a vendor's pool drained, a node type gone). It restarts with
fewer ranks (torchrun --nnodes=MIN:MAX re-rendezvous, or the operator relaunching the survivors) and
the same command line. Each rank says which group of the job's cluster spec it belongs to
(MEGAHET_DEVICE_GROUP, else the one group whose backend this host runs by default); the ranks agree
through the rendezvous store; the spec shrinks to what is present; the planner chooses a plan for it
with the same global batch size; and the run resumes from the newest checkpoint: the same samples in
the same order, the same math (to floating-point reduction order).
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from megahet.errors import MegahetError
from megahet.hetero.cluster import ClusterSpec, load_cluster, parse_cluster

log = logging.getLogger("megahet")

GROUP_ENV = "MEGAHET_DEVICE_GROUP"
_KEY = "megahet/elastic/group/{}"


@dataclass
class ElasticSetup:
    """What this attempt runs on: `cluster` (the original spec, or its surviving groups)."""
    cluster: ClusterSpec
    original: ClusterSpec
    lost: List[str] = field(default_factory=list)  # e.g. "'slow' (1 of 1 devices)"
    store: Optional[object] = None  # the rendezvous store the ranks agreed through (build the groups with it)


def own_group(spec: ClusterSpec, env: Optional[Mapping[str, str]] = None,
              default_backend: Optional[str] = None) -> str:
    """The cluster group this rank belongs to: $MEGAHET_DEVICE_GROUP, else the only group whose backend
    this host runs by default (a CUDA host in a cuda + npu spec); MegahetError when that is ambiguous."""
    env = os.environ if env is None else env
    names = [g.name for g in spec.groups]
    name = env.get(GROUP_ENV)
    if name:
        if name not in names:
            raise MegahetError(f"{GROUP_ENV}={name} names no group of the cluster spec; use one of {names}")
        return name
    if default_backend is None:
        from megahet.device import default_backend_name
        default_backend = default_backend_name()
    matches = [g.name for g in spec.groups if g.backend == default_backend]
    if len(matches) == 1:
        return matches[0]
    raise MegahetError(f"--elastic cannot tell which cluster group this rank is ({len(matches)} groups run this "
                       f"host's backend '{default_backend}'); set {GROUP_ENV} to one of {names} for it")


def surviving_cluster(spec: ClusterSpec, owners: Sequence[str]) -> Tuple[ClusterSpec, List[str]]:
    """(spec of the groups present, lost groups described) from each rank's group, in rank order (pure).

    Ranks are given to groups in the order the spec lists them, so the ranks of one group must be
    consecutive; the surviving spec lists the groups in rank order.
    """
    by_name = {g.name: g for g in spec.groups}
    counts = Counter(owners)
    for name, n in counts.items():
        if n > by_name[name].devices:
            raise MegahetError(f"{n} ranks report cluster group '{name}', which has {by_name[name].devices} devices "
                               f"in the spec; fix {GROUP_ENV} on the extra ranks or the cluster spec")
    order = list(dict.fromkeys(owners))
    runs = sum(1 for i, name in enumerate(owners) if i == 0 or owners[i - 1] != name)
    if runs != len(order):
        raise MegahetError(f"the ranks of one cluster group must be consecutive, got groups {list(owners)} by rank; "
                           f"launch each group's ranks together (e.g. one torchrun node per group)")
    groups = []
    for name in order:
        g = by_name[name]
        per_node = min(g.devices_per_node, counts[name]) if g.devices_per_node else g.devices_per_node
        groups.append(replace(g, devices=counts[name], devices_per_node=per_node))
    lost = [f"'{g.name}' ({g.devices - counts.get(g.name, 0)} of {g.devices} devices)"
            for g in spec.groups if counts.get(g.name, 0) < g.devices]
    return ClusterSpec(groups, dict(spec.links)), lost


def exchange_groups(store, rank: int, world_size: int, mine: str) -> List[str]:
    """Every rank's group name, in rank order, through the rendezvous store (one key per rank)."""
    store.set(_KEY.format(rank), mine)
    return [store.get(_KEY.format(r)).decode() for r in range(world_size)]


def newest_checkpoint_meta(load: Optional[str]) -> Tuple[Optional[str], Optional[dict]]:
    """(path, meta) of the checkpoint --load would resume from, or (None, None)."""
    if not load or not os.path.isdir(load):
        return None, None
    from megahet.training import checkpoint as ckpt
    try:
        path = ckpt.find_checkpoint(load)
        return (path, ckpt.read_meta(path)) if path else (None, None)
    except MegahetError:
        return None, None  # loading reports the damage (and --load-fallback applies) later


def original_cluster(cfg, meta: Optional[dict], path: Optional[str]) -> ClusterSpec:
    """The job's cluster spec: --cluster, else the one recorded in the checkpoint to resume from."""
    if cfg.hetero.cluster:
        return load_cluster(cfg.hetero.cluster)
    if meta and meta.get("cluster"):
        return parse_cluster(meta["cluster"], f"the cluster spec recorded in {path}")
    raise MegahetError("--elastic needs the job's cluster spec: pass --cluster FILE (or --load a checkpoint "
                       "saved by a run that had one)")


def elastic_setup(cfg, rank: int, world_size: int, timeout_s: float) -> ElasticSetup:
    """Find the groups present and, when some were lost, prepare `cfg` for re-planning (every rank
    calls this before the process groups exist)."""
    from megahet.parallel.context import rendezvous_store
    path, meta = newest_checkpoint_meta(cfg.checkpoint.load)
    original = original_cluster(cfg, meta, path)
    full = world_size == original.world_size
    mine = os.environ.get(GROUP_ENV, "") if full else own_group(original)
    store = rendezvous_store(rank, world_size, timeout_s) if world_size > 1 else None
    owners = exchange_groups(store, rank, world_size, mine) if store is not None else [mine]
    if not any(owners):
        return ElasticSetup(original, original, store=store)  # everything present, ranks in spec order
    if not all(owners):
        unset = [r for r, o in enumerate(owners) if not o]
        raise MegahetError(f"{GROUP_ENV} is set on some ranks but not on ranks {unset}; set it on every rank or none")
    cluster, lost = surviving_cluster(original, owners)
    if lost:
        _prepare_replan(cfg, original, cluster, lost, path, meta)
    return ElasticSetup(cluster, original, lost, store)


def _prepare_replan(cfg, original: ClusterSpec, cluster: ClusterSpec, lost: List[str], path, meta) -> None:
    """Log what was lost and the plan being replaced; drop the plan file and layout flags (made for the
    full cluster) so the planner chooses for the survivors."""
    left = ", ".join(f"'{g.name}' x {g.devices}" for g in cluster.groups)
    log.warning("megahet: elastic: lost %s; re-planning for the %d ranks left (%s), global batch size %d",
                ", ".join(lost), cluster.world_size, left, cfg.train.global_batch_size)
    if meta and meta.get("plan"):
        from megahet.hetero.plan import Plan
        try:
            old_cluster = parse_cluster(meta.get("cluster") or original.to_dict(), "recorded cluster")
            table = Plan.from_dict(meta["plan"], "recorded plan").table(old_cluster)
        except MegahetError as exc:
            table = f"(unreadable: {exc})"
        log.warning("megahet: elastic: plan of the checkpoint %s (%d ranks):\n%s", path, original.world_size, table)
    if cfg.hetero.plan:
        log.warning("megahet: elastic: --plan %s was made for the full cluster; the planner replaces it", cfg.hetero.plan)
        cfg.hetero.plan = None
    from megahet.hetero.autoplan import _DEFAULTS as _LAYOUT_DEFAULTS  # the layout flags and their defaults
    given: Dict[str, object] = {k: getattr(cfg.parallel, k) for k, d in _LAYOUT_DEFAULTS.items()
                                if getattr(cfg.parallel, k) != d}
    if given:
        log.warning("megahet: elastic: layout flags %s were made for the full cluster; the planner replaces them",
                    given)
        for k in given:
            setattr(cfg.parallel, k, _LAYOUT_DEFAULTS[k])
    if getattr(cfg, "explicit_fields", None) is not None:  # given at their defaults counts as given too
        cfg.explicit_fields = frozenset(cfg.explicit_fields) - set(_LAYOUT_DEFAULTS)
