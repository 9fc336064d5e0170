"""Choose a plan: stages, layers, TP/EP, pipelines and micro-batches that minimise predicted step time.

The search is pruned, not enumerated:
1. Layouts. Either every pipeline mixes groups (stage k of every pipeline on the same group; stages per
   group proportional to its devices, sites kept contiguous, larger-memory groups first because early
   stages hold more micro-batches in flight), or each pipeline lives in one group ("split": replicas
   of different speed, balanced by uneven micro-batch counts). The DP degree is swept over the values
   that change how many stages each group gets, so at most a few hundred layouts exist even at 50,000
   devices. TP per group starts at the smallest degree that fits in memory.
2. A fast score per (layout, micro-batch size, EP, recompute): layers balanced by speed, the 1F1B time
   (m - 1) x slowest stage + fill, data-parallel time, a memory check with the schedule's in-flight
   micro-batches.
3. The best few are made exact (layers by dynamic programming over stages, or balanced by speed and
   repaired at scale; micro-batches apportioned exactly to the global batch; virtual stages tried) and
   predicted by simulating their real schedules (predict.py). The fastest that fits memory wins.
"""
from __future__ import annotations

import heapq
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from megahet.errors import MegahetError
from megahet.hetero import cost_model as cm
from megahet.hetero.batch_split import min_max_split
from megahet.hetero.predict import Options, Prediction, predict

log = logging.getLogger("megahet")

_RECOMPUTE = (None, "selective", "full")
_UNSET = "unset"


@dataclass
class Constraints:
    """Layout settings fixed by the user (None: searched)."""
    tp: Optional[int] = None
    pp: Optional[int] = None
    dp: Optional[int] = None
    ep: Optional[int] = None
    micro_batch_size: Optional[int] = None
    virtual_stages: Optional[int] = None
    recompute: object = _UNSET          # None / "selective" / "full" when fixed
    pipeline_layers: Optional[List[int]] = None
    layout: Optional[str] = None        # "mixed" | "split" | None


@dataclass
class Settings:
    micro_batch_sizes: Tuple[int, ...] = (1, 2, 4, 8)
    top_k: int = 10
    max_virtual_stages: int = 4
    exact_partition_limit: int = 200_000   # p * L^2 above which layers are balanced and repaired instead
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    use_all_devices: bool = True   # a runnable plan gives every rank of the cluster spec a stage
    per_stage_recompute: bool = True  # full recompute only of the layers each stage needs to fit


@dataclass
class Candidate:
    """A plan before it is made exact: pipeline types share p stages and per-stage TP."""
    kind: str
    types: List[Tuple[Tuple[str, ...], int]]   # (stage groups, number of pipelines of this type)
    tps: Tuple[int, ...]
    mbs: int
    ep: int
    recompute: Optional[str]
    score: float = math.inf
    layers: Optional[List[int]] = None

    @property
    def p(self) -> int:
        return len(self.tps)

    @property
    def pipelines(self) -> int:
        return sum(n for _, n in self.types)

    def devices_used(self) -> int:
        return sum(n * sum(self.tps) for _, n in self.types)

    def describe(self) -> str:
        kinds = " + ".join(f"{n} x [{', '.join(_runs(g))}]" for g, n in self.types)
        tp = ",".join(map(str, sorted(set(self.tps))))
        return (f"{self.kind}: {kinds}, TP {tp}, EP {self.ep}, micro-batch {self.mbs}, "
                f"recompute {self.recompute or 'none'}")


def _runs(stage_groups: Sequence[str]) -> List[str]:
    out: List[Tuple[str, int]] = []
    for g in stage_groups:
        if out and out[-1][0] == g:
            out[-1] = (g, out[-1][1] + 1)
        else:
            out.append((g, 1))
    return [f"{g} x{n}" for g, n in out]


@dataclass
class Result:
    plan: dict
    prediction: Prediction
    options: Options
    candidate: Candidate
    runner_up: Optional[Tuple[dict, Prediction, Candidate]] = None
    why_runner_up_lost: str = ""
    evaluated: int = 0
    simulated: int = 0
    seconds: float = 0.0
    alternatives: List[Tuple[dict, Prediction, Candidate]] = field(default_factory=list)  # best first


# -- layouts ----------------------------------------------------------------------------------------
def _tp_candidates(g: cm.GroupSpec, spec: cm.ModelSpec, fixed: Optional[int]) -> List[int]:
    if fixed:
        return [fixed]
    out, t = [], 1
    while t <= min(g.devices_per_node, g.devices):
        if spec.check_tp(t) is None:
            out.append(t)
        t *= 2
    return out or [1]


def _ordered_groups(groups: Dict[str, cm.GroupSpec]) -> List[cm.GroupSpec]:
    """Pipeline order: sites contiguous (one cut per site boundary), larger memory first within a site."""
    site_order: Dict[str, int] = {}
    for g in groups.values():
        site_order.setdefault(g.site, len(site_order))
    return sorted(groups.values(), key=lambda g: (site_order[g.site], -g.memory_gb, -g.peak_tflops))


def _mixed_layouts(groups, spec, c: Constraints, gbs: int) -> List[Tuple[Tuple[str, ...], Tuple[int, ...], int]]:
    """(stage groups, stage TPs, pipelines) of every mixed layout worth scoring."""
    order = _ordered_groups(groups)
    # TP per device kind, not per group: the same hardware on two sites gets the same degree.
    kinds: Dict[tuple, int] = {}
    kind_of = [kinds.setdefault((g.backend, g.peak_tflops, g.memory_gb, g.devices_per_node), len(kinds))
               for g in order]
    first = {k: next(g for g, kk in zip(order, kind_of) if kk == k) for k in kinds.values()}
    tp_sets = [_tp_candidates(first[k], spec, c.tp) for k in range(len(kinds))]
    out = {}
    for kind_tps in _product(tp_sets):
        tps = tuple(kind_tps[k] for k in kind_of)
        ds = set()
        for g, t in zip(order, tps):
            for k in range(1, spec.num_layers + 1):
                d = g.devices // (k * t)
                if d >= 1:
                    ds.add(d)
        if c.dp:
            ds = {c.dp}
        for d in ds:
            if d > gbs:
                continue
            ks = [g.devices // (d * t) for g, t in zip(order, tps)]
            p = sum(ks)
            if p < 1 or p > spec.num_layers or (c.pp and p != c.pp):
                continue
            stage_groups = tuple(g.name for g, k in zip(order, ks) for _ in range(k))
            stage_tps = tuple(t for t, k in zip(tps, ks) for _ in range(k))
            key = (stage_groups, stage_tps)
            if out.get(key, 0) < d:
                out[key] = d
    return [(sg, st, d) for (sg, st), d in out.items()]


def _split_layouts(groups, spec, c: Constraints, gbs: int):
    """(per-group pipeline counts, p, tp): every pipeline inside one group, all with p stages and TP tp."""
    out = []
    tps = {t for g in groups.values() for t in _tp_candidates(g, spec, c.tp)}
    for t in sorted(tps):
        if spec.check_tp(t) or any(t > g.devices_per_node for g in groups.values()):
            continue
        for p in range(1, spec.num_layers + 1):
            if c.pp and p != c.pp:
                continue
            counts = {g.name: g.devices // (p * t) for g in groups.values()}
            n = sum(counts.values())
            if n < 1 or n > gbs or (c.dp and n != c.dp):
                continue
            out.append((counts, p, t))
    return out


def _product(sets):
    if not sets:
        yield ()
        return
    for x in sets[0]:
        for rest in _product(sets[1:]):
            yield (x,) + rest


# -- fast score -------------------------------------------------------------------------------------
class _Costs:
    """Memoised per-layer cost of (group, mbs, tp, ep, recompute)."""

    def __init__(self, spec, groups, links):
        self.spec, self.groups, self.links = spec, groups, links
        self.memo: Dict[tuple, Tuple[float, float, float, float]] = {}

    def layer(self, g: str, mbs: int, tp: int, ep: int, rc) -> Tuple[float, float, float, float]:
        """(seconds fwd+bwd per micro-batch of an average layer, activation bytes, state bytes, extra s)."""
        key = (g, mbs, tp, ep, rc)
        hit = self.memo.get(key)
        if hit is None:
            from megahet.hetero.predict import _chunk_cost
            spec, grp = self.spec, self.groups[g]
            n_moe = sum(1 for i in range(spec.num_layers) if spec.is_moe(i))
            frac = n_moe / spec.num_layers
            dense_id = next((i for i in range(spec.num_layers) if not spec.is_moe(i)), None)
            moe_id = next((i for i in range(spec.num_layers) if spec.is_moe(i)), None)
            t = a = s = 0.0
            for lid, w in ((dense_id, 1 - frac), (moe_id, frac)):
                if lid is None or w == 0:
                    continue
                f, b, act = _chunk_cost(spec, grp, self.links, [lid], False, False, mbs, tp, ep, rc)
                cnt = cm.layer_params(spec, lid, tp, ep)
                t, a = t + w * (f + b), a + w * act
                s += w * (cnt.dense + cnt.expert) * spec.param_bytes + w * cnt.fp32 * 4
            ef, eb, eact = _chunk_cost(spec, grp, self.links, [], True, False, mbs, tp, ep, rc)
            hf, hb, hact = _chunk_cost(spec, grp, self.links, [], False, True, mbs, tp, ep, rc)
            hit = (t, a, s, (ef + eb, eact, hf + hb, hact))
            self.memo[key] = hit
        return hit


def _balance(times: Sequence[float], extra: Sequence[float], layers: int) -> List[int]:
    """Layers per stage (>= 1 each) minimising max(n_j * times[j] + extra[j]): fill by speed, then repair."""
    p = len(times)
    if layers < p:
        raise MegahetError(f"{p} pipeline stages need at least {p} layers, the model has {layers}")
    inv = sum(1.0 / t for t in times)
    target = (layers + sum(e / t for e, t in zip(extra, times))) / inv
    n = [max(1, int((target - e) / t)) for t, e in zip(times, extra)]
    while sum(n) > layers:
        j = max((j for j in range(p) if n[j] > 1), key=lambda j: n[j] * times[j] + extra[j])
        n[j] -= 1
    heap = [((n[j] + 1) * times[j] + extra[j], j) for j in range(p)]
    heapq.heapify(heap)
    while sum(n) < layers:
        _, j = heapq.heappop(heap)
        n[j] += 1
        heapq.heappush(heap, ((n[j] + 1) * times[j] + extra[j], j))
    return n


def _score(cand: Candidate, costs: _Costs, gbs: int, spec: cm.ModelSpec, settings: Settings
           ) -> Tuple[float, Dict[str, float]]:
    """Fast step-time estimate and per-group memory overflow (GB) of a candidate (v = 1, 1F1B)."""
    p = cand.p
    units = gbs // cand.mbs
    per_type = []
    overflow: Dict[str, float] = {}
    d = cand.pipelines
    expert_dp = max(d // cand.ep, 1)
    for stage_groups, count in cand.types:
        lay = [costs.layer(g, cand.mbs, t, cand.ep, cand.recompute) for g, t in zip(stage_groups, cand.tps)]
        times = [x[0] for x in lay]
        extra = [0.0] * p
        extra[0] += lay[0][3][0]
        extra[-1] += lay[-1][3][2]
        n = cand.layers if cand.layers else _balance(times, extra, spec.num_layers)
        stage_t = [n[j] * times[j] + extra[j] for j in range(p)]
        per_type.append((count, max(stage_t), sum(stage_t)))
        for j, (g, t) in enumerate(zip(stage_groups, cand.tps)):
            grp = costs.groups[g]
            m_est = max(1, units // d)
            inflight = min(p - j, m_est)
            act = inflight * n[j] * lay[j][1] + (inflight * lay[0][3][1] if j == 0 else 0) + (
                lay[-1][3][3] if j == p - 1 else 0)
            states = n[j] * lay[j][2] / spec.param_bytes  # elements (approx: router counted as 2 units)
            emb = spec.padded_vocab(t) // t * spec.hidden if (j == 0 or j == p - 1) else 0
            elems = states + emb
            opt = 12 * elems / (d if settings.distributed_optimizer else 1)
            need = elems * (spec.param_bytes + 4) + opt + act + grp.reserved_gb * cm.GB
            if need > grp.memory_bytes:
                overflow[g] = max(overflow.get(g, 0.0), (need - grp.memory_bytes) / cm.GB)
    # Micro-batches: one common finish time T over all pipelines, m_i = T / slowest_i - (p - 1).
    rate = sum(count / slow for count, slow, _ in per_type)
    fills = sum(count * (total - slow) / slow for count, slow, total in per_type)
    T = (units + fills) / rate
    return T, overflow


# -- exact plans ------------------------------------------------------------------------------------
def _partition_exact(times_of, p: int, L: int) -> List[int]:
    """Contiguous split of layers 0..L-1 into p stages minimising the slowest stage (DP over stages).

    times_of(j, a, b): seconds of layers a..b-1 on stage j (inf when they do not fit).
    """
    INF = math.inf
    best = [[INF] * (L + 1) for _ in range(p + 1)]
    cut = [[0] * (L + 1) for _ in range(p + 1)]
    best[0][0] = 0.0
    for j in range(1, p + 1):
        for b in range(j, L - (p - j) + 1):
            for a in range(j - 1, b):
                if best[j - 1][a] == INF:
                    continue
                v = max(best[j - 1][a], times_of(j - 1, a, b))
                if v < best[j][b]:
                    best[j][b], cut[j][b] = v, a
    if best[p][L] == INF:
        raise MegahetError("no split of the layers fits every stage's memory")
    out, b = [], L
    for j in range(p, 0, -1):
        a = cut[j][b]
        out.append(b - a)
        b = a
    return out[::-1]


def _apportion(units: int, types: List[Tuple[int, float, float]]) -> List[List[int]]:
    """Micro-batches per pipeline (per type: a list, one per pipeline) summing exactly to `units`.

    types: (pipelines, slowest stage s, fill s). Each unit goes where the finish time grows least.
    """
    counts = [[0] * n for n, _, _ in types]
    total = sum(n for n, _, _ in types)
    if units < total:
        raise MegahetError(f"{units} micro-batches cannot feed {total} pipelines")
    heap = []
    for ti, (n, slow, fill) in enumerate(types):
        for i in range(n):
            counts[ti][i] = 1
            heap.append((fill + 2 * slow, ti, i))  # finish time with one more micro-batch
    heapq.heapify(heap)
    for _ in range(units - total):
        _, ti, i = heapq.heappop(heap)
        counts[ti][i] += 1
        _, slow, fill = types[ti]
        heapq.heappush(heap, (fill + slow * (counts[ti][i] + 1), ti, i))
    return counts


def make_plan(cand: Candidate, costs: _Costs, gbs: int, spec: cm.ModelSpec, v: int,
              settings: Settings, fixed_layers: Optional[List[int]] = None) -> dict:
    """Exact plan dict (layers, micro-batches) for a candidate."""
    p = cand.p
    ref_groups, _ = max(cand.types, key=lambda x: x[1])
    lay = [costs.layer(g, cand.mbs, t, cand.ep, cand.recompute) for g, t in zip(ref_groups, cand.tps)]
    times = [x[0] for x in lay]
    extra = [0.0] * p
    extra[0] += lay[0][3][0]
    extra[-1] += lay[-1][3][2]
    if fixed_layers:
        layers = list(fixed_layers)
    elif p * spec.num_layers ** 2 <= settings.exact_partition_limit and v == 1:
        layers = _partition_exact(lambda j, a, b: (b - a) * times[j] + extra[j], p, spec.num_layers)
    else:
        layers = _balance(times, extra, spec.num_layers)
    if v > 1:
        layers = _round_to_chunks(layers, v, times, extra)
    cand.layers = layers
    types = []
    for stage_groups, n in cand.types:
        lc = [costs.layer(g, cand.mbs, t, cand.ep, cand.recompute) for g, t in zip(stage_groups, cand.tps)]
        ex = [0.0] * p
        ex[0] += lc[0][3][0]
        ex[-1] += lc[-1][3][2]
        st = [layers[j] * lc[j][0] + ex[j] for j in range(p)]
        slow = max(st)
        types.append((n, slow, sum(st) / v - slow / v))
    # Interleaving needs multiples of p micro-batches per pipeline; an EP group's pipelines share a count.
    units, step, ep = gbs // cand.mbs, (p if v > 1 else 1), cand.ep
    if units % (step * ep) or any(n % ep for n, _, _ in types):
        raise MegahetError(f"{units} micro-batches do not split into blocks of {step} x EP {ep}")
    blocks = _apportion(units // (step * ep), [(n // ep, s * step, f) for n, s, f in types])
    counts = [[m * step for m in ms for _ in range(ep)] for ms in blocks]
    pipelines = []
    for (stage_groups, _), mcounts in zip(cand.types, counts):
        for m in mcounts:
            pipelines.append({"micro_batch_size": cand.mbs, "micro_batches": m,
                              "stages": [{"group": g, "tensor_parallel": t} for g, t in zip(stage_groups, cand.tps)]})
    return {"layers": layers, "virtual_stages": v, "expert_parallel": cand.ep, "pipelines": pipelines}


def finer_split(plan: dict, cand: Candidate, costs: _Costs, gbs: int, sizes: Sequence[int],
                max_pipelines: int = 16, max_batch: int = 4096) -> Optional[dict]:
    """The plan with the global batch re-split over its pipelines one sample at a time, each pipeline
    with its own micro-batch size (one of `sizes` up to the candidate's that divides its samples),
    minimising the latest finish (batch_split.min_max_split); None when that changes nothing or the
    plan is out of scope.

    Whole micro-batches of one size split a batch coarsely: 24 micro-batches of 2 over replicas of
    speed 1 : 0.45 can only be 17 : 7 or 16 : 8, 3-4% slower than the speeds allow; 33 : 15 samples
    (micro-batches of 1 on both) come within 1%. Exact: the smallest finish time T for
    which a choice of per-pipeline sample counts, each finishing by T, sums to the global batch
    (bitsets of reachable sums, binary search over T). Only for plans without interleaving or EP
    (those need counts in blocks) and with at most `max_pipelines` pipelines.
    """
    pipes = plan["pipelines"]
    n, p, layers = len(pipes), len(plan["layers"]), plan["layers"]
    if n < 2 or n > max_pipelines or gbs > max_batch or plan.get("virtual_stages", 1) != 1 or cand.ep != 1:
        return None
    sizes = sorted({b for b in sizes if b <= cand.mbs} | {cand.mbs})
    rows: Dict[tuple, List[Tuple[float, int]]] = {}  # pipeline shape -> [samples] -> (finish s, mbs)
    for pipe in pipes:
        shape = tuple((st["group"], int(st["tensor_parallel"])) for st in pipe["stages"])
        if shape in rows:
            continue
        per_size = {}
        for b in sizes:
            lay = [costs.layer(g, b, t, 1, cand.recompute) for g, t in shape]
            st = [layers[j] * lay[j][0] for j in range(p)]
            st[0] += lay[0][3][0]
            st[-1] += lay[-1][3][2]
            per_size[b] = (sum(st) - max(st), max(st))  # (fill, slowest stage) of one micro-batch
        # Per sample count the fastest size; on a tie the larger one (fewer micro-batches to run).
        rows[shape] = [(math.inf, 0)] + [min(((fill + s // b * slow, -b) for b, (fill, slow) in per_size.items()
                                              if s % b == 0), default=(math.inf, 0)) for s in range(1, gbs + 1)]
    best = [rows[tuple((st["group"], int(st["tensor_parallel"])) for st in pipe["stages"])] for pipe in pipes]
    samples = min_max_split([[t for t, _ in row] for row in best], gbs)
    if samples is None:
        return None
    new = []
    for pipe, s, row in zip(pipes, samples, best):
        b = -row[s][1]
        new.append({**pipe, "micro_batch_size": b, "micro_batches": s // b})
    if [(q["micro_batch_size"], q["micro_batches"]) for q in new] == \
            [(q["micro_batch_size"], q["micro_batches"]) for q in pipes]:
        return None
    return {**plan, "pipelines": new}


def _round_to_chunks(layers: List[int], v: int, times, extra) -> List[int]:
    """Layer counts for v chunks per stage: multiples of v (equal chunks) where the total allows, else
    the balanced counts with at least v layers per stage, which the runtime splits into chunks as evenly
    as it can (pipeline_layout: 7 layers in 2 chunks are 4 + 3). Llama 3 405B's 126 layers on 16
    stages, for one, have no split into multiples of 4."""
    L = sum(layers)
    for step in (v, 1):
        out = [max(v, round(n / step) * step) for n in layers]
        while sum(out) > L and any(n - step >= v for n in out):
            j = max((j for j in range(len(out)) if out[j] - step >= v), key=lambda j: out[j] * times[j] + extra[j])
            out[j] -= step
        while sum(out) < L:
            j = min(range(len(out)), key=lambda j: (out[j] + step) * times[j] + extra[j])
            out[j] += step
        if sum(out) == L:
            return out
    raise MegahetError("layers do not split into the virtual stages")


# -- search -----------------------------------------------------------------------------------------
def search(spec: cm.ModelSpec, groups: Dict[str, cm.GroupSpec], links: cm.Links, global_batch_size: int,
           constraints: Constraints = Constraints(), settings: Settings = Settings()) -> Result:
    """The fastest plan that fits every device's memory; MegahetError naming the group that lacks it."""
    t0 = time.perf_counter()
    c = constraints
    gbs = global_batch_size
    costs = _Costs(spec, groups, links)
    if c.pipeline_layers and c.pp is None:
        c.pp = len(c.pipeline_layers)
    mbs_list = [c.micro_batch_size] if c.micro_batch_size else [b for b in settings.micro_batch_sizes if gbs % b == 0]
    rc_list = [c.recompute] if c.recompute != _UNSET else list(_RECOMPUTE)
    ep_all = _divisors(spec.num_experts) if spec.num_experts else [1]
    if c.ep:
        ep_all = [c.ep]
    layouts: List[Candidate] = []
    if c.layout in (None, "mixed"):
        for sg, st, d in _mixed_layouts(groups, spec, c, gbs):
            layouts.append(Candidate("mixed", [(sg, d)], st, 0, 1, None))
    if c.layout in (None, "split") and (len(groups) > 1 or not layouts):
        for counts, p, t in _split_layouts(groups, spec, c, gbs):
            types = [((g,) * p, n) for g, n in counts.items() if n > 0]
            layouts.append(Candidate("split", types, (t,) * p, 0, 1, None))
    if settings.use_all_devices:
        world = sum(g.devices for g in groups.values())
        layouts = [x for x in layouts if x.devices_used() == world]
    if not layouts:
        raise MegahetError(_no_layout_reason(spec, groups, c, gbs, settings.use_all_devices))
    scored: List[Candidate] = []
    least_bad: Optional[Tuple[float, Dict[str, float], Candidate]] = None
    evaluated = 0
    for base in layouts:
        d = base.pipelines
        eps = [e for e in ep_all if _ep_fits(e, base)] or ([1] if not spec.num_experts else [])
        for mbs in mbs_list:
            if d * mbs > gbs:
                continue
            for ep in eps:
                for rc in rc_list:
                    cand = Candidate(base.kind, base.types, base.tps, mbs, ep, rc, layers=c.pipeline_layers)
                    try:
                        score, over = _score(cand, costs, gbs, spec, settings)
                    except MegahetError:
                        continue
                    evaluated += 1
                    if over:
                        worst = sum(over.values())
                        if least_bad is None or worst < least_bad[0]:
                            least_bad = (worst, over, cand)
                        continue
                    cand.score = score
                    scored.append(cand)
                    break  # more recompute only costs time once this one fits
    if not scored:
        raise MegahetError(_infeasible_reason(least_bad, groups, spec, c))
    scored.sort(key=lambda x: x.score)
    top = _distinct(scored, settings.top_k)
    options = lambda cand: Options(recompute=cand.recompute,  # noqa: E731
                                   distributed_optimizer=settings.distributed_optimizer,
                                   overlap_grad_reduce=settings.overlap_grad_reduce)
    finals: List[Tuple[float, dict, Prediction, Candidate]] = []
    simulated = 0
    for cand in top:
        for v in _vpp_options(cand, spec, c, settings, gbs):
            try:
                plan = make_plan(Candidate(cand.kind, cand.types, cand.tps, cand.mbs, cand.ep, cand.recompute),
                                 costs, gbs, spec, v, settings, c.pipeline_layers)
            except MegahetError:
                continue
            pred = predict(plan, spec, groups, links, options(cand))
            simulated += 1
            finer = finer_split(plan, cand, costs, gbs, mbs_list) if v == 1 else None
            if finer is not None:  # the same layout with the batch split finer: kept when predicted faster
                finer_pred = predict(finer, spec, groups, links, options(cand))
                simulated += 1
                if finer_pred.feasible and finer_pred.step_time_s < pred.step_time_s:
                    plan, pred = finer, finer_pred
            if settings.per_stage_recompute and cand.recompute == "full" and pred.feasible and not c.pipeline_layers:
                plan, pred = _refine_recompute(plan, pred, cand, costs, spec, groups, links, options(cand), settings)
            if not pred.feasible:
                if least_bad is None or sum(pred.overflow.values()) < least_bad[0]:
                    least_bad = (sum(pred.overflow.values()), pred.overflow, cand)
                continue
            finals.append((pred.step_time_s, plan, pred, cand))
    if not finals:
        raise MegahetError(_infeasible_reason(least_bad, groups, spec, c))
    finals.sort(key=lambda x: x[0])
    _, plan, pred, cand = finals[0]
    pred = predict(plan, spec, groups, links, options(cand), keep_timeline=True)
    plan["predicted"] = _predicted_block(pred, cand)
    res = Result(plan, pred, options(cand), cand, evaluated=evaluated, simulated=simulated,
                 alternatives=[(f[1], f[2], f[3]) for f in finals])
    other = next((f for f in finals[1:] if f[3].describe() != cand.describe() or f[1]["virtual_stages"]
                  != plan["virtual_stages"]), None)
    if other:
        res.runner_up = (other[1], other[2], other[3])
        res.why_runner_up_lost = why_lost(pred, other[2], other[3], other[1])
    res.seconds = time.perf_counter() - t0
    return res


def per_stage_recompute(plan: dict, spec: cm.ModelSpec, groups: Dict[str, cm.GroupSpec], links: cm.Links,
                        opts: Options, rounds: int = 4) -> Optional[Tuple[dict, Prediction]]:
    """The plan with `recompute_layers`: per stage, the fewest of each chunk's first layers recomputed
    in full (Megatron's block method) that keep the stage within its devices' memory. Early stages
    hold more micro-batches in flight, so they recompute more than late ones. None when every stage
    needs all its layers recomputed anyway, or nothing fits.

    A stage's memory depends only on its own count (activations in flight x bytes per micro-batch),
    and falls linearly with it, so two predictions (none, all) give each stage's count; the result is
    checked and stages still over their memory get one layer more, up to `rounds` times.
    """
    p, v = len(plan["layers"]), int(plan.get("virtual_stages", 1) or 1)
    most = max(-(-n // v) for n in plan["layers"])  # the longest chunk
    if most == 0:
        return None

    def stage_memory(blocks):
        pred = predict({**plan, "recompute_layers": blocks}, spec, groups, links, opts)
        return pred, [(s.memory.total, groups[s.group].memory_bytes) for s in pred.stages]

    _, none = stage_memory([0] * p)
    _, full = stage_memory([most] * p)
    blocks = []
    for (m0, cap), (m1, _) in zip(none, full):
        if m0 <= cap:
            blocks.append(0)
        elif m1 >= m0 or m1 > cap:
            blocks.append(most)
        else:
            blocks.append(min(most, max(1, math.ceil((m0 - cap) / ((m0 - m1) / most)))))
    if all(b == most for b in blocks):
        return None
    for _ in range(rounds):
        pred, mem = stage_memory(blocks)
        over = [k for k, (m, cap) in enumerate(mem) if m > cap and blocks[k] < most]
        if not over and pred.feasible:
            return {**plan, "recompute_layers": blocks}, pred
        if not over:
            return None
        for k in over:
            blocks[k] += 1
    return None


def _refine_recompute(plan, pred, cand: Candidate, costs: _Costs, spec, groups, links, opts: Options,
                      settings: Settings, rounds: int = 2):
    """Per-stage recompute for a full-recompute plan, then layers re-balanced for what each stage now
    costs (a stage that recomputes more gets fewer layers) and the counts chosen again; the fastest
    plan seen is kept."""
    best = (plan, pred)
    ref_groups, _ = max(cand.types, key=lambda x: x[1])
    p, v = cand.p, int(plan.get("virtual_stages", 1) or 1)
    base = [costs.layer(g, cand.mbs, t, cand.ep, None) for g, t in zip(ref_groups, cand.tps)]
    full = [costs.layer(g, cand.mbs, t, cand.ep, "full") for g, t in zip(ref_groups, cand.tps)]
    extra = [0.0] * p
    extra[0] += base[0][3][0]
    extra[-1] += base[-1][3][2]
    current = plan
    for _ in range(rounds):
        refined = per_stage_recompute(current, spec, groups, links, opts)
        if refined is None:
            break
        if refined[1].step_time_s < best[1].step_time_s:
            best = refined
        blocks = refined[0]["recompute_layers"]
        if p == 1:
            break

        def stage_time(j, a, b, blocks=blocks):
            n = b - a
            return n * base[j][0] + min(blocks[j] * v, n) * (full[j][0] - base[j][0]) + extra[j]
        if p * spec.num_layers ** 2 <= settings.exact_partition_limit and v == 1:
            layers = _partition_exact(stage_time, p, spec.num_layers)
        else:  # at scale: balance on the per-layer cost the counts give on average per stage
            per = [base[j][0] + min(1.0, blocks[j] * v / max(plan["layers"][j], 1)) * (full[j][0] - base[j][0])
                   for j in range(p)]
            layers = _balance(per, extra, spec.num_layers)
            if v > 1:
                layers = _round_to_chunks(layers, v, per, extra)
        if layers == current["layers"]:
            break
        current = {k: x for k, x in plan.items() if k != "recompute_layers"}
        current["layers"] = layers
    return best


def _predicted_block(pred: Prediction, cand: Candidate) -> dict:
    return {"step_time_s": round(pred.step_time_s, 6), "tokens_per_s": round(pred.tokens_per_s, 3),
            "recompute_granularity": cand.recompute}


def _vpp_options(cand: Candidate, spec, c: Constraints, settings: Settings, gbs: int) -> List[int]:
    if c.virtual_stages:
        return [c.virtual_stages]
    if cand.p == 1:
        return [1]
    out = [1]
    per_pipe = gbs // cand.mbs // cand.pipelines
    for v in range(2, settings.max_virtual_stages + 1):
        if spec.num_layers >= cand.p * v and per_pipe % cand.p == 0 and per_pipe >= cand.p:
            out.append(v)
    return out


def _ep_fits(ep: int, cand: Candidate) -> bool:
    """EP groups form across pipelines at each stage and must stay inside one group (one domain)."""
    return all(n % ep == 0 for _, n in cand.types)


def _distinct(cands: List[Candidate], k: int) -> List[Candidate]:
    seen, out = set(), []
    for cand in cands:
        key = cand.describe()
        if key not in seen:
            seen.add(key)
            out.append(cand)
        if len(out) == k:
            break
    return out


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def why_lost(best: Prediction, other: Prediction, cand: Candidate, plan: dict) -> str:
    """One sentence: the runner-up and the part of its step time that lost."""
    parts = {"pipeline bubble": other.pipeline_time_s * other.bubble - best.pipeline_time_s * best.bubble,
             "compute per stage": other.pipeline_time_s * (1 - other.bubble) - best.pipeline_time_s * (1 - best.bubble),
             "exposed gradient reduction": other.dp_exposed_s - best.dp_exposed_s,
             "optimizer step": other.optimizer_s - best.optimizer_s}
    reason = max(parts, key=parts.get)
    gap = (other.step_time_s / best.step_time_s - 1) * 100 if best.step_time_s else 0.0
    return (f"runner-up {cand.describe()}, virtual stages {plan['virtual_stages']}: "
            f"{other.step_time_s:.4g} s/step (+{gap:.1f}%), mostly {reason} (+{parts[reason]:.3g} s)")


def _no_layout_reason(spec, groups, c: Constraints, gbs: int, all_devices: bool) -> str:
    fixed = ", ".join(f"{k}={v}" for k, v in (("tp", c.tp), ("pp", c.pp), ("dp", c.dp)) if v)
    every = " using every device" if all_devices else ""
    return (f"no layout of {sum(g.devices for g in groups.values())} devices{every} fits {spec.num_layers} layers "
            f"and --global-batch-size {gbs}{' with ' + fixed if fixed else ''}; relax the fixed layout flags, raise "
            f"--global-batch-size{', or allow idle devices (tools/plan.py --allow-idle)' if all_devices else ''}")


def _gb(value: float) -> str:
    """A shortfall in GB, with enough digits that a small one does not print as 0.0."""
    return f"{value:.1f} GB" if value >= 0.05 else f"{value * 1024:.0f} MB" if value >= 0.0005 else "<1 MB"


def _infeasible_reason(least_bad, groups, spec, c: Constraints) -> str:
    if least_bad is None:
        return "no plan fits the cluster; relax the fixed layout flags"
    _, over, cand = least_bad
    g = max(over, key=over.get)
    grp = groups[g]
    return (f"group '{g}' ({grp.devices} x {grp.memory_gb:g} GB) lacks memory: even the best layout "
            f"({cand.describe()}) needs {_gb(over[g])} more per device; add devices or memory to '{g}', "
            f"use --use-distributed-optimizer, or train a smaller model")


# -- cluster spec -> cost-model groups ---------------------------------------------------------------
_DOMAIN = {"cpu": "cpu", "sim": "sim", "cuda": "cuda", "npu": "npu"}
_PROFILED = ("cpu", "sim")  # backends measured on this machine (sim is CPU compute slowed by `speed`)


def cluster_groups(cluster, profile=None) -> Dict[str, cm.GroupSpec]:
    """Cost-model groups of a ClusterSpec.

    `profile`: for cpu and sim groups, either one CPU Profile (a sim group's times are scaled by
    1 / speed) or {group name: Profile}, each group's own profile measured with its co-running ranks
    (a sim group's times already include its idling: no scaling; autoplan.measure_profiles).
    Devices not present need `tflops` and `memory_gb` in the spec; cpu/sim groups take their memory
    from the spec or this host's memory shared by the local ranks.
    """
    out: Dict[str, cm.GroupSpec] = {}
    local = sum(g.devices for g in cluster.groups if g.backend in _PROFILED)
    own = profile if isinstance(profile, dict) else None
    for g in cluster.groups:
        if g.name in out:
            raise MegahetError(f"cluster spec lists group '{g.name}' twice; give each group its own name")
        prof = own.get(g.name) if own is not None else profile
        profiled = g.backend in _PROFILED and prof is not None
        speed = 1.0 if own is not None else float(g.speed or 1.0)
        tflops = g.tflops
        if tflops is None and profiled:
            tflops = prof.peak_tflops * speed
        if tflops is None:
            raise MegahetError(f"cluster group '{g.name}' ({g.backend}) needs 'tflops' (peak dense TFLOP/s per "
                               f"device) to be planned: it is not present here to be measured")
        memory = g.memory_gb
        if memory is None and g.backend in _PROFILED:
            memory = _host_memory_gb() / max(local, 1)
        if memory is None:
            raise MegahetError(f"cluster group '{g.name}' ({g.backend}) needs 'memory_gb' per device to be planned")
        out[g.name] = cm.GroupSpec(
            name=g.name, backend=g.backend, devices=g.devices,
            devices_per_node=int(g.devices_per_node or (g.devices if g.backend in _PROFILED else 8)),
            peak_tflops=float(tflops), memory_gb=float(memory),
            domain=g.domain or _DOMAIN.get(g.backend, g.backend), site=str(getattr(g, "site", None) or "site0"),
            speed=speed if profiled else 1.0,
            efficiency=float(getattr(g, "efficiency", None) or cm.EFFICIENCY.get(g.backend, 0.5)),
            memory_bandwidth=float(getattr(g, "memory_bandwidth_gbps", None) or 0) * cm.GB
            or cm.DEFAULT_MEM_BW.get(g.backend, 1e12),
            reserved_gb=(prof.reserved_bytes / cm.GB if profiled and getattr(prof, "reserved_bytes", 0.0)
                         else cm.RESERVED_GB.get(g.backend, 0.0)), profile=prof if profiled else None)
    return out


def _host_memory_gb() -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 / cm.GB
    except OSError:
        pass
    return 16.0
