"""Cluster spec: which backend every rank runs, with device capabilities and links (YAML).

Ranks are given to groups in the order listed. The planner (a later wave) reads the same file; this
module only turns it into per-rank backend assignments for the ParallelContext.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import yaml

from megahet.errors import MegahetError
from megahet.parallel.context import RankSpec

_GROUP_KEYS = {"name", "backend", "devices", "devices_per_node", "tflops", "memory_gb", "speed", "domain", "site",
               "efficiency", "memory_bandwidth_gbps", "speed_file"}
_LINK_KEYS = {"intra_node", "inter_node", "cross_domain", "cross_site", "cross_site_latency_ms"}


@dataclass
class DeviceGroup:
    name: str
    backend: str
    devices: int
    devices_per_node: Optional[int] = None
    tflops: Optional[float] = None
    memory_gb: Optional[float] = None
    speed: Optional[float] = None  # sim only
    domain: Optional[str] = None  # sim only: several sim groups may form separate domains
    site: Optional[str] = None  # data centre; groups on different sites talk over links.cross_site
    efficiency: Optional[float] = None  # planner: achievable fraction of `tflops` (hetero/cost_model.py)
    memory_bandwidth_gbps: Optional[float] = None  # planner: device memory bandwidth for the optimizer step
    speed_file: Optional[str] = None  # sim only: a file whose number, when present, overrides `speed` live

    def backend_options(self) -> Dict:
        opts: Dict = {}
        if self.speed is not None:
            if self.backend != "sim":
                raise MegahetError(f"cluster group '{self.name}': 'speed' applies to the sim backend only")
            opts["speed"] = self.speed
        if self.speed_file is not None:
            if self.backend != "sim":
                raise MegahetError(f"cluster group '{self.name}': 'speed_file' applies to the sim backend only")
            opts["speed_file"] = str(self.speed_file)
        if self.domain is not None:
            opts["domain"] = self.domain
        if self.tflops is not None:
            opts["peak_tflops"] = self.tflops
        return opts


@dataclass
class ClusterSpec:
    groups: List[DeviceGroup]
    links: Dict[str, float] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return sum(g.devices for g in self.groups)

    def to_dict(self) -> dict:
        """The spec as `parse_cluster` reads it (checkpoints record the cluster a job ran on)."""
        groups = [{k: v for k, v in asdict(g).items() if v is not None} for g in self.groups]
        return {"groups": groups, "links": dict(self.links)} if self.links else {"groups": groups}

    def rank_specs(self) -> List[RankSpec]:
        """Backend of every global rank, in the order the groups are listed."""
        out: List[RankSpec] = []
        for g in self.groups:
            out += [RankSpec(g.backend, g.backend_options()) for _ in range(g.devices)]
        return out


def parse_cluster(raw: dict, source: str = "cluster spec") -> ClusterSpec:
    if not isinstance(raw, dict) or not isinstance(raw.get("groups"), list) or not raw["groups"]:
        raise MegahetError(f"{source} needs a non-empty 'groups' list; see the cluster spec in the README")
    unknown = set(raw) - {"groups", "links"}
    if unknown:
        raise MegahetError(f"{source}: unknown top-level key(s) {sorted(unknown)}; allowed: groups, links")
    groups = []
    for i, g in enumerate(raw["groups"]):
        if not isinstance(g, dict):
            raise MegahetError(f"{source}: group {i} must be a mapping such as {{backend: cpu, devices: 1}}")
        bad = set(g) - _GROUP_KEYS
        if bad:
            raise MegahetError(f"{source}: group {i} has unknown key(s) {sorted(bad)}; allowed: {sorted(_GROUP_KEYS)}")
        if "backend" not in g or "devices" not in g:
            raise MegahetError(f"{source}: group {i} needs 'backend' and 'devices'")
        devices = _positive(g["devices"], int)
        if devices is None:
            raise MegahetError(f"{source}: group {i} has devices {g['devices']!r}; give a whole number >= 1")
        groups.append(DeviceGroup(name=str(g.get("name", f"group{i}")), backend=str(g["backend"]),
                                  devices=devices, devices_per_node=g.get("devices_per_node"),
                                  tflops=g.get("tflops"), memory_gb=g.get("memory_gb"), speed=g.get("speed"),
                                  domain=g.get("domain"), site=None if g.get("site") is None else str(g["site"]),
                                  efficiency=g.get("efficiency"), memory_bandwidth_gbps=g.get("memory_bandwidth_gbps"),
                                  speed_file=g.get("speed_file")))
    links = raw.get("links") or {}
    if not isinstance(links, dict):
        raise MegahetError(f"{source}: 'links' must be a mapping such as {{cross_domain: 10}} (GB/s)")
    bad = set(links) - _LINK_KEYS
    if bad:
        raise MegahetError(f"{source}: unknown link key(s) {sorted(bad)}; allowed: {sorted(_LINK_KEYS)}")
    bandwidths = {k: _positive(v, float) for k, v in links.items()}
    bad = sorted(k for k, v in bandwidths.items() if v is None)
    if bad:
        raise MegahetError(f"{source}: link(s) {bad} need a positive bandwidth in GB/s per direction")
    return ClusterSpec(groups, bandwidths)


def _positive(value, kind):
    """`kind(value)` when that is a number > 0, else None."""
    try:
        number = kind(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def load_cluster(path: str) -> ClusterSpec:
    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh)
    except FileNotFoundError:
        raise MegahetError(f"cluster file {path} not found; pass an existing --cluster FILE") from None
    except yaml.YAMLError as exc:
        raise MegahetError(f"cluster file {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_cluster(raw, path)
