"""Plan: what every rank does — layer split, per-pipeline micro-batches, per-stage group and TP degree.

A plan is the one description of a parallel layout. Uniform flags (--tensor-model-parallel-size,
--pipeline-model-parallel-size, --pipeline-layers, --micro-batch-size) build one with `Plan.uniform`,
a plan file (--plan FILE, written by tools/plan.py) is read with `Plan.from_yaml`; the runtime only
ever sees a Plan. The YAML format is documented in the README ("Writing a plan"):

    layers: [5, 3]              # transformer layers per stage, shared by all pipelines
    virtual_stages: 1           # interleaved schedule when > 1
    expert_parallel: 1          # EP groups: `expert_parallel` consecutive pipelines at each stage
    pipelines:                  # data-parallel replicas
      - micro_batch_size: 2
        micro_batches: 4
        stages:
          - {group: fast, tensor_parallel: 2}     # or ranks: [0, 1]
          - {group: slow, tensor_parallel: 1}
    recompute_layers: [2, 0]    # optional, per stage: full recompute of each chunk's first N layers
    predicted: {step_time_s: 1.9}

Ranks are taken, for each pipeline and each stage in order, as the next `tensor_parallel` unused
ranks of the stage's group (cluster spec order) unless the stage lists them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import yaml

from megahet.errors import MegahetError

__all__ = ["StagePlan", "PipelinePlan", "Plan", "even_layers", "load_plan", "rank_domains", "group_domain",
           "single_group_cluster"]

_PLAN_KEYS = {"layers", "virtual_stages", "expert_parallel", "pipelines", "predicted", "recompute_layers"}
_PIPELINE_KEYS = {"micro_batch_size", "micro_batches", "stages"}
_STAGE_KEYS = {"group", "tensor_parallel", "ranks"}


@dataclass
class StagePlan:
    """One stage of one pipeline: served by `tensor_parallel` ranks of device group `group`."""
    group: str
    tensor_parallel: int = 1
    ranks: Optional[List[int]] = None  # explicit global ranks; default: next unused ranks of the group

    def to_dict(self) -> dict:
        d: dict = {"group": self.group, "tensor_parallel": self.tensor_parallel}
        if self.ranks is not None:
            d["ranks"] = list(self.ranks)
        return d


@dataclass
class PipelinePlan:
    """One data-parallel replica: its micro-batch size and count, and one StagePlan per stage."""
    micro_batch_size: int
    micro_batches: int
    stages: List[StagePlan]

    @property
    def samples(self) -> int:
        """Samples this replica contributes to one global batch."""
        return self.micro_batch_size * self.micro_batches

    def to_dict(self) -> dict:
        return {"micro_batch_size": self.micro_batch_size, "micro_batches": self.micro_batches,
                "stages": [s.to_dict() for s in self.stages]}


@dataclass
class Plan:
    """Layer split shared by all pipelines plus every pipeline's micro-batches and stage placement."""
    layers: List[int]
    pipelines: List[PipelinePlan]
    virtual_stages: int = 1
    expert_parallel: int = 1
    predicted: Dict = field(default_factory=dict)
    # Per stage: full recompute of the first N layers of each of its chunks (the planner's per-stage
    # recompute; Megatron's block method with a count per stage). None: the recompute flags apply.
    recompute_layers: Optional[List[int]] = None

    # ---- shape ---------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.layers)

    @property
    def num_pipelines(self) -> int:
        return len(self.pipelines)

    @property
    def global_batch_size(self) -> int:
        return sum(p.samples for p in self.pipelines)

    def stage_tp(self, stage: int) -> int:
        """TP degree of `stage` (the same in every pipeline once validated)."""
        return self.pipelines[0].stages[stage].tensor_parallel

    @property
    def num_ranks(self) -> int:
        return sum(s.tensor_parallel for p in self.pipelines for s in p.stages)

    def is_uniform(self) -> bool:
        """True when every pipeline has the same micro-batches and every stage the same TP degree."""
        first = self.pipelines[0]
        tps = {s.tensor_parallel for p in self.pipelines for s in p.stages}
        return len(tps) == 1 and all(p.micro_batch_size == first.micro_batch_size and
                                     p.micro_batches == first.micro_batches for p in self.pipelines)

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def uniform(cls, tp: int, pp: int, dp: int, layers: Sequence[int], micro_batch_size: int,
                micro_batches: int, *, virtual_stages: int = 1, expert_parallel: int = 1,
                cluster=None, group: str = "default") -> "Plan":
        """The plan the uniform flags describe, with megahet's classic rank order.

        Ranks follow rank = tp_rank + tp * (dp_rank + dp * pp_rank) (tensor parallel fastest, then
        data parallel, then pipeline), so they are listed explicitly; each stage's group is the
        cluster group of its first rank (or `group` without a cluster spec).

        Args:
            layers: transformer layers per stage (length pp); use `even_layers` for an even split.
            micro_batches: micro-batches per replica (global batch / (dp x micro_batch_size)).
        """
        owner = _rank_owner(cluster) if cluster is not None else None
        pipelines = []
        for d in range(dp):
            stages = []
            for p in range(pp):
                ranks = [t + tp * (d + dp * p) for t in range(tp)]
                name = owner[ranks[0]] if owner is not None and ranks[0] < len(owner) else group
                stages.append(StagePlan(name, tp, ranks))
            pipelines.append(PipelinePlan(micro_batch_size, micro_batches, stages))
        return cls(list(layers), pipelines, virtual_stages, expert_parallel)

    @classmethod
    def from_dict(cls, raw, source: str = "plan") -> "Plan":
        """Parse a plan mapping strictly (unknown keys are errors); call validate() before use."""
        if not isinstance(raw, dict):
            raise MegahetError(f"{source} must be a mapping with 'layers' and 'pipelines'; see 'Writing a plan' "
                               "in the README")
        _no_unknown(raw, _PLAN_KEYS, source)
        for key in ("layers", "pipelines"):
            if key not in raw:
                raise MegahetError(f"{source} needs '{key}'; see 'Writing a plan' in the README")
        layers = raw["layers"]
        if not isinstance(layers, list) or not layers:
            raise MegahetError(f"{source}: 'layers' must be a non-empty list of layers per stage, e.g. [5, 3]")
        layers = [_int(v, f"{source}: layers[{i}]", minimum=1) for i, v in enumerate(layers)]
        if not isinstance(raw["pipelines"], list) or not raw["pipelines"]:
            raise MegahetError(f"{source}: 'pipelines' must be a non-empty list of data-parallel replicas")
        pipelines = []
        for i, p in enumerate(raw["pipelines"]):
            where = f"{source}: pipeline {i}"
            if not isinstance(p, dict):
                raise MegahetError(f"{where} must be a mapping with micro_batch_size, micro_batches and stages")
            _no_unknown(p, _PIPELINE_KEYS, where)
            for key in _PIPELINE_KEYS:
                if key not in p:
                    raise MegahetError(f"{where} needs '{key}'")
            if not isinstance(p["stages"], list) or not p["stages"]:
                raise MegahetError(f"{where}: 'stages' must be a non-empty list such as [{{group: fast, "
                                   "tensor_parallel: 1}]")
            stages = []
            for k, s in enumerate(p["stages"]):
                swhere = f"{where} stage {k}"
                if not isinstance(s, dict) or "group" not in s:
                    raise MegahetError(f"{swhere} must be a mapping with 'group' (and optional tensor_parallel, "
                                       "ranks)")
                _no_unknown(s, _STAGE_KEYS, swhere)
                ranks = s.get("ranks")
                if ranks is not None:
                    if not isinstance(ranks, list):
                        raise MegahetError(f"{swhere}: 'ranks' must be a list of global ranks, e.g. [0, 1]")
                    ranks = [_int(r, f"{swhere}: ranks", minimum=0) for r in ranks]
                stages.append(StagePlan(str(s["group"]),
                                        _int(s.get("tensor_parallel", 1), f"{swhere}: tensor_parallel", minimum=1),
                                        ranks))
            pipelines.append(PipelinePlan(_int(p["micro_batch_size"], f"{where}: micro_batch_size", minimum=1),
                                          _int(p["micro_batches"], f"{where}: micro_batches", minimum=1),
                                          stages))
        predicted = raw.get("predicted") or {}
        if not isinstance(predicted, dict):
            raise MegahetError(f"{source}: 'predicted' must be a mapping such as {{step_time_s: 1.9}}")
        recompute = raw.get("recompute_layers")
        if recompute is not None:
            if not isinstance(recompute, list) or len(recompute) != len(layers):
                raise MegahetError(f"{source}: 'recompute_layers' must list one count per stage ({len(layers)}), "
                                   f"e.g. {[0] * len(layers)}")
            recompute = [_int(v, f"{source}: recompute_layers[{i}]", minimum=0) for i, v in enumerate(recompute)]
        return cls(layers, pipelines,
                   _int(raw.get("virtual_stages", 1), f"{source}: virtual_stages", minimum=1),
                   _int(raw.get("expert_parallel", 1), f"{source}: expert_parallel", minimum=1),
                   dict(predicted), recompute)

    @classmethod
    def from_yaml(cls, path_or_text: str) -> "Plan":
        """Read a plan from a YAML file path or from YAML text (anything containing a newline or ':')."""
        text, source = path_or_text, "plan"
        if "\n" not in path_or_text and ":" not in path_or_text.split("/")[-1]:
            source = f"plan file {path_or_text}"
            try:
                with open(path_or_text) as fh:
                    text = fh.read()
            except FileNotFoundError:
                raise MegahetError(f"plan file {path_or_text} not found; pass an existing --plan FILE "
                                   "(tools/plan.py --output writes one)") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise MegahetError(f"{source} is not valid YAML ({str(exc).splitlines()[0]})") from None
        return cls.from_dict(raw, source)

    def to_dict(self) -> dict:
        d: dict = {"layers": list(self.layers), "virtual_stages": self.virtual_stages,
                   "expert_parallel": self.expert_parallel, "pipelines": [p.to_dict() for p in self.pipelines]}
        if self.recompute_layers is not None:
            d["recompute_layers"] = list(self.recompute_layers)
        if self.predicted:
            d["predicted"] = dict(self.predicted)
        return d

    def to_yaml(self, path: Optional[str] = None) -> str:
        """The plan as YAML text (stages in flow style, one per line); written to `path` when given."""
        text = yaml.dump(self.to_dict(), Dumper=_PlanDumper, sort_keys=False, default_flow_style=None)
        if path is not None:
            with open(path, "w") as fh:
                fh.write(text)
        return text

    # ---- ranks -----------------------------------------------------------------------------
    def rank_assignment(self, cluster) -> List[List[List[int]]]:
        """Global ranks of every stage of every pipeline: result[pipeline][stage] = [tp ranks].

        Stages that list `ranks` get them; the others take the next unused ranks of their group,
        in cluster order. Raises MegahetError when a group runs out of ranks.
        """
        members = _group_members(cluster)
        listed = {r for p in self.pipelines for s in p.stages if s.ranks is not None for r in s.ranks}
        free = {name: [r for r in ranks if r not in listed] for name, ranks in members.items()}
        out: List[List[List[int]]] = []
        for i, p in enumerate(self.pipelines):
            row = []
            for k, s in enumerate(p.stages):
                if s.ranks is not None:
                    row.append(sorted(s.ranks))  # TP rank order follows global rank order
                    continue
                if s.group not in free:
                    raise MegahetError(f"plan pipeline {i} stage {k}: group '{s.group}' is not in the cluster spec "
                                       f"(groups: {', '.join(members)}); fix the group name")
                pool = free[s.group]
                if len(pool) < s.tensor_parallel:
                    raise MegahetError(f"plan pipeline {i} stage {k} needs {s.tensor_parallel} more rank(s) of group "
                                       f"'{s.group}' but only {len(pool)} are left of its {len(members[s.group])}; "
                                       "use fewer pipelines/TP there or add devices to the group")
                row.append(pool[:s.tensor_parallel])
                del pool[:s.tensor_parallel]
            out.append(row)
        return out

    # ---- validation ------------------------------------------------------------------------
    def validate(self, cluster, num_layers: int, global_batch_size: int, world_size: Optional[int] = None, *,
                 num_attention_heads: Optional[int] = None, num_query_groups: Optional[int] = None,
                 num_experts: Optional[int] = None, seq_length: Optional[int] = None,
                 sequence_parallel: bool = False, tp_divides: Optional[Dict[str, int]] = None) -> List[List[List[int]]]:
        """Check that this plan can run on `cluster`; return its rank assignment.

        Raises MegahetError with a one-line message naming the problem and the fix for: layers not
        summing to num_layers, pipelines with a different stage count, stage TP degrees that differ
        across pipelines, micro-batches not summing to the global batch, unknown groups, ranks outside
        the world or used twice, more (or fewer) ranks than the world, a TP or EP group spanning
        communication domains, EP replicas with different micro-batch counts, and model sizes that a
        stage's TP degree does not divide (num_attention_heads, num_query_groups, seq_length with
        sequence parallelism, and every `tp_divides` entry, e.g. {"--ffn-hidden-size": 1024}).
        """
        pp = self.num_stages
        if sum(self.layers) != num_layers:
            raise MegahetError(f"plan layers {self.layers} sum to {sum(self.layers)} but --num-layers is {num_layers}; "
                               "make the per-stage layer counts add up")
        if self.virtual_stages > 1:
            if pp == 1:
                raise MegahetError("plan virtual_stages > 1 needs at least two stages; set virtual_stages: 1")
            bad = [n for n in self.layers if n < self.virtual_stages]
            if bad:
                raise MegahetError(f"plan layers {self.layers}: every stage needs at least virtual_stages "
                                   f"{self.virtual_stages} layers (one per model chunk); change layers or "
                                   "virtual_stages")
        for i, p in enumerate(self.pipelines):
            if len(p.stages) != pp:
                raise MegahetError(f"plan pipeline {i} has {len(p.stages)} stages but layers has {pp} entries; "
                                   "every pipeline needs one stage per layers entry")
        for k in range(pp):
            tps = [p.stages[k].tensor_parallel for p in self.pipelines]
            if len(set(tps)) > 1:
                raise MegahetError(f"plan stage {k} has tensor_parallel {tps} across pipelines; stage k needs the same "
                                   "TP degree in every pipeline so gradient shards line up")
            sizes = [("num_attention_heads", num_attention_heads), ("num_query_groups", num_query_groups)]
            for what, size in sizes + sorted((tp_divides or {}).items()):
                if size is not None and size % tps[0]:
                    raise MegahetError(f"plan stage {k} has tensor_parallel {tps[0]}, which does not divide "
                                       f"{what} {size}; use a TP degree that divides it")
            if sequence_parallel and seq_length is not None and seq_length % tps[0]:
                raise MegahetError(f"plan stage {k} has tensor_parallel {tps[0]}, which does not divide --seq-length "
                                   f"{seq_length} as sequence parallelism needs; change one of them")
        if self.global_batch_size != global_batch_size:
            counts = " + ".join(f"{p.micro_batch_size}x{p.micro_batches}" for p in self.pipelines)
            raise MegahetError(f"plan micro-batches {counts} = {self.global_batch_size} samples but --global-batch-size "
                               f"is {global_batch_size}; make micro_batch_size x micro_batches sum to it")
        world = cluster_world_size(cluster)
        if world_size is not None and world != world_size:
            raise MegahetError(f"the cluster spec describes {world} ranks but {world_size} were launched; launch "
                               f"{world} ranks or fix the cluster file")
        if self.num_ranks > world:
            raise MegahetError(f"plan needs {self.num_ranks} ranks but the world has {world}; use fewer pipelines or "
                               "smaller TP degrees, or launch more ranks")
        for i, p in enumerate(self.pipelines):
            for k, s in enumerate(p.stages):
                if s.ranks is None:
                    continue
                if len(s.ranks) != s.tensor_parallel:
                    raise MegahetError(f"plan pipeline {i} stage {k} lists {len(s.ranks)} ranks for tensor_parallel "
                                       f"{s.tensor_parallel}; list exactly one rank per TP rank")
                outside = [r for r in s.ranks if r >= world]
                if outside:
                    raise MegahetError(f"plan pipeline {i} stage {k} lists rank(s) {outside} but the world has "
                                       f"{world} ranks (0..{world - 1}); fix the ranks")
        domains = rank_domains(cluster)
        owner = _rank_owner(cluster)
        for i, p in enumerate(self.pipelines):  # domain before group: the clearer message for TP across vendors
            for k, s in enumerate(p.stages):
                if s.ranks is None:
                    continue
                spanned = sorted({domains[r] for r in s.ranks})
                if len(spanned) > 1:
                    raise MegahetError(f"plan pipeline {i} stage {k}: tensor-parallel ranks {s.ranks} span "
                                       f"communication domains {spanned}; TP groups must stay inside one vendor")
                stray = [r for r in s.ranks if owner[r] != s.group]
                if stray:
                    raise MegahetError(f"plan pipeline {i} stage {k} lists rank(s) {stray}, which belong to group(s) "
                                       f"{sorted({owner[r] for r in stray})}, not '{s.group}'; fix the group or ranks")
        assignment = self.rank_assignment(cluster)
        seen: Dict[int, str] = {}
        for i, row in enumerate(assignment):
            for k, ranks in enumerate(row):
                for r in ranks:
                    if r in seen:
                        raise MegahetError(f"plan gives rank {r} to both {seen[r]} and pipeline {i} stage {k}; "
                                           "every rank serves one stage of one pipeline")
                    seen[r] = f"pipeline {i} stage {k}"
        if len(seen) != world:
            idle = sorted(set(range(world)) - set(seen))
            raise MegahetError(f"plan uses {len(seen)} of the world's {world} ranks (idle: {idle}); add pipelines "
                               "or TP, or launch fewer ranks")
        self._validate_experts(assignment, domains, num_experts)
        return assignment

    def _validate_experts(self, assignment, domains: List[str], num_experts: Optional[int]) -> None:
        ep = self.expert_parallel
        if ep == 1:
            return
        if self.num_pipelines % ep:
            raise MegahetError(f"plan expert_parallel {ep} does not divide its {self.num_pipelines} pipelines; EP groups "
                               "are formed from consecutive pipelines, so use a divisor")
        if num_experts is not None and num_experts % ep:
            raise MegahetError(f"--num-experts {num_experts} is not divisible by plan expert_parallel {ep}")
        for first in range(0, self.num_pipelines, ep):
            block = list(range(first, first + ep))
            counts = [self.pipelines[i].micro_batches for i in block]
            if len(set(counts)) > 1:
                raise MegahetError(f"plan pipelines {block} form one expert-parallel group but have micro_batches "
                                   f"{counts}; EP replicas must share a micro-batch count (sizes may differ)")
            for k in range(self.num_stages):
                spanned = sorted({domains[assignment[i][k][0]] for i in block})
                if len(spanned) > 1:
                    raise MegahetError(f"plan stage {k} of pipelines {block} forms an expert-parallel group spanning "
                                       f"communication domains {spanned}; EP groups must stay inside one vendor")


    def table(self, cluster) -> str:
        """The plan as a text table (pipelines x stages: group, backend, TP, layers, ranks), for the log."""
        backend = {g.name: g.backend for g in cluster.groups}
        assignment = self.rank_assignment(cluster)
        rows = [["pipeline", "micro-batches"] + [f"stage {k} ({n} layers)" for k, n in enumerate(self.layers)]]
        for i, p in enumerate(self.pipelines):
            cells = [f"{s.group}/{backend.get(s.group, '?')} tp{s.tensor_parallel} r{','.join(map(str, r))}"
                     for s, r in zip(p.stages, assignment[i])]
            rows.append([str(i), f"{p.micro_batch_size}x{p.micro_batches}"] + cells)
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        extra = f"virtual_stages {self.virtual_stages}, expert_parallel {self.expert_parallel}"
        return "\n".join(lines + [extra])


def even_layers(num_layers: int, stages: int) -> List[int]:
    """Layers per stage for an even split, the remainder on the first stages."""
    base, extra = divmod(num_layers, stages)
    return [base + (1 if k < extra else 0) for k in range(stages)]


def load_plan(path: str) -> Plan:
    """Plan.from_yaml for a file path (the --plan flag)."""
    return Plan.from_yaml(path)


# ---- cluster helpers (a cluster may be a ClusterSpec or None for "one group of the default backend") --
def _group_members(cluster) -> Dict[str, List[int]]:
    members: Dict[str, List[int]] = {}
    start = 0
    for g in cluster.groups:
        members.setdefault(g.name, []).extend(range(start, start + g.devices))
        start += g.devices
    return members


def _rank_owner(cluster) -> List[str]:
    return [g.name for g in cluster.groups for _ in range(g.devices)]


def cluster_world_size(cluster) -> int:
    return sum(g.devices for g in cluster.groups)


def group_domain(group) -> str:
    """Communication domain of a cluster group, from its backend (without touching a device)."""
    if group.domain:
        return str(group.domain)
    from megahet.device import get_backend
    try:
        return get_backend(group.backend, **group.backend_options()).domain
    except MegahetError:
        return group.backend  # an unregistered backend (e.g. planning for hardware not installed here)


def rank_domains(cluster) -> List[str]:
    """Communication domain of every global rank, in cluster order."""
    out: List[str] = []
    for g in cluster.groups:
        out += [group_domain(g)] * g.devices
    return out


def _no_unknown(raw: dict, allowed: set, where: str) -> None:
    unknown = set(raw) - allowed
    if unknown:
        raise MegahetError(f"{where} has unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")


def _int(value, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MegahetError(f"{where} is {value!r}; give a whole number >= {minimum}")
    return value


class _PlanDumper(yaml.SafeDumper):
    """Block style for the plan's structure, flow style for leaf mappings and lists (one stage a line)."""


def _represent_dict(dumper, data):
    flow = all(not isinstance(v, (dict, list)) or (isinstance(v, list) and all(isinstance(x, int) for x in v))
               for v in data.values())
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=flow)


def _represent_list(dumper, data):
    flow = all(isinstance(x, (int, float, str)) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_PlanDumper.add_representer(dict, _represent_dict)
_PlanDumper.add_representer(list, _represent_list)


def single_group_cluster(world_size: int, backend: str = "cpu", name: str = "default"):
    """The implicit cluster of a run without --cluster: one group of `world_size` ranks of `backend`."""
    from megahet.hetero.cluster import ClusterSpec, DeviceGroup
    return ClusterSpec([DeviceGroup(name=name, backend=backend, devices=world_size)])
