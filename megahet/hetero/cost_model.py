"""Cost model of a plan: compute, memory and communication per rank, from profiles or FLOPs.

Every figure is per rank and per micro-batch where it occurs, so the simulator (simulate.py) can
place it on the actual schedule. Compute comes from a measured profile (profile.py) for backends
present, else from FLOPs x peak x a per-kind achievable efficiency (``EFFICIENCY``, documented below).
Memory counts exactly what megahet allocates (parameters in their dtype, the fp32 router, fp32 main
gradients, fp32 masters and Adam moments, sharded over data parallel by the distributed optimizer)
plus activations x micro-batches in flight on that stage (taken from the schedule itself).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Sequence, Tuple

from megahet.errors import MegahetError
from megahet.training.flops import transformer_flops_per_token

GB = 1e9
GIB = float(1024 ** 3)

# Achievable fraction of peak dense FLOP/s for large bf16 GEMM-dominated transformer layers, per
# backend, used only for devices that are not present to be profiled. CUDA 0.70: Megatron-LM reports
# 163 TFLOP/s per A100 (52% of 312) *including* pipeline bubbles, TP and DP communication for GPT-1T
# (Narayanan et al. 2021, Table 1); the layer GEMMs themselves run at ~70% of peak (cuBLAS large-GEMM
# figures). Calibrated once against that table's 1T row and then held fixed for every other row and
# model. NPU 0.55: Ascend 910B MindSpeed reports about 50-55% MFU on Llama-style models. A cluster group
# may override it with `efficiency:`.
EFFICIENCY = {"cuda": 0.70, "npu": 0.55, "cpu": 0.5, "sim": 0.5}
# Per-message latency (s) by link kind; bandwidths default to the design's example figures.
DEFAULT_LINKS = {"intra_node": 100.0, "inter_node": 25.0, "cross_domain": 10.0, "cross_site": 1.25}
DEFAULT_LATENCY = {"intra_node": 5e-6, "inter_node": 1e-5, "cross_domain": 1e-4, "cross_site": 1e-2}
# Memory the runtime holds outside the model per device, GB, for devices not measured here: CUDA
# context, cuBLAS/cuDNN workspaces and NCCL buffers (~3 GB on H100/A100 with PyTorch 2.x), the CANN
# context and HCCL buffers (~4 GB on Ascend 910B). cpu/sim ranks measure theirs instead (a one-layer
# job's resident memory beyond its model: process_memory.runtime_overhead, in Profile.reserved_bytes,
# ~80 MB here); 0 when no such measurement was taken.
RESERVED_GB = {"cuda": 3.0, "npu": 4.0, "cpu": 0.0, "sim": 0.0}
# HBM bandwidth used for the optimizer step when no profile exists (bytes/s); per-group override
# `memory_bandwidth_gbps`. The Adam step touches ~ 4*(2 read+write master, grad, 2 moments) bytes/param.
DEFAULT_MEM_BW = {"cuda": 2.0e12, "npu": 1.6e12, "cpu": 2.0e10, "sim": 2.0e10}
ADAM_BYTES_PER_PARAM = 4 * 7


@dataclass(frozen=True)
class ModelSpec:
    """The planner's view of the model: exactly the sizes megahet builds (config.finalize applied)."""
    num_layers: int
    hidden: int
    ffn: int
    heads: int
    query_groups: int
    kv_channels: int
    seq: int
    vocab: int
    vocab_divisible_by: int = 128
    swiglu: bool = True
    layernorm: bool = False
    bias: bool = False
    learned_positions: bool = False
    max_positions: int = 0
    tied: bool = True
    num_experts: int = 0
    topk: int = 2
    moe_ffn: int = 0
    shared_ffn: int = 0
    moe_layer_freq: int = 1
    param_bytes: int = 2
    sequence_parallel: bool = True
    flash_attention: bool = True  # False: attention scores [b, n, s, s] are materialised (pre-2022 kernels)

    @classmethod
    def from_config(cls, cfg, vocab_size: Optional[int] = None) -> "ModelSpec":
        """From a finalized MegahetConfig; `vocab_size` defaults to --vocab-size (or 32000)."""
        m, t = cfg.model, cfg.train
        vocab = vocab_size or m.vocab_size or 32000
        return cls(num_layers=m.num_layers, hidden=m.hidden_size, ffn=m.ffn_hidden_size, heads=m.num_attention_heads,
                   query_groups=m.num_query_groups or m.num_attention_heads,
                   kv_channels=m.kv_channels or m.hidden_size // m.num_attention_heads, seq=m.seq_length,
                   vocab=vocab, vocab_divisible_by=m.make_vocab_size_divisible_by, swiglu=m.swiglu,
                   layernorm=m.normalization == "LayerNorm", bias=not m.disable_bias_linear,
                   learned_positions=m.position_embedding_type == "learned_absolute",
                   max_positions=m.max_position_embeddings or m.seq_length,
                   tied=not m.untie_embeddings_and_output_weights, num_experts=m.num_experts or 0,
                   topk=m.moe_router_topk, moe_ffn=m.moe_ffn_hidden_size or 0,
                   shared_ffn=m.moe_shared_expert_intermediate_size or 0, moe_layer_freq=m.moe_layer_freq,
                   param_bytes=2 if (t.bf16 or t.fp16) else 4, sequence_parallel=cfg.parallel.sequence_parallel)

    def is_moe(self, layer: int) -> bool:
        return bool(self.num_experts) and layer % self.moe_layer_freq == 0

    def padded_vocab(self, tp: int) -> int:
        unit = self.vocab_divisible_by * tp
        return -(-self.vocab // unit) * unit

    def check_tp(self, tp: int) -> Optional[str]:
        """Why this TP degree cannot shard the model (None when it can)."""
        for what, n in (("attention heads", self.heads), ("query groups", self.query_groups),
                        ("ffn hidden size", self.ffn), ("expert ffn size", self.moe_ffn or tp),
                        ("shared expert size", self.shared_ffn or tp)):
            if n % tp:
                return f"{what} {n} not divisible by tensor parallel {tp}"
        return None


@dataclass
class GroupSpec:
    """One device group of the cluster as the cost model sees it (figures per device)."""
    name: str
    backend: str
    devices: int
    devices_per_node: int
    peak_tflops: float
    memory_gb: float
    domain: str
    site: str = "site0"
    speed: float = 1.0
    efficiency: float = 0.5
    memory_bandwidth: float = 2.0e12
    reserved_gb: float = 0.0
    profile: Optional[object] = None  # profile.Profile for backends measured here

    @property
    def memory_bytes(self) -> float:
        """The device's memory; a rank's predicted total includes `reserved_gb` (Memory.reserved)."""
        return self.memory_gb * GB


@dataclass
class Links:
    """Bandwidth (bytes/s per direction) and latency (s) per link kind.

    `ops` holds per-collective figures measured on this host ("intra_node/all_reduce": (bytes/s, s)),
    in the ring formulas' terms (see `params`): gloo's collectives cost more per call and per byte than
    its point-to-point messages (an all-reduce of 4 KB takes ~3 one-way latencies, and it reduces on the
    CPU), so charging a collective from the point-to-point fit under-counts it.
    """
    bandwidth: Dict[str, float] = field(default_factory=lambda: {k: v * GB for k, v in DEFAULT_LINKS.items()})
    latency: Dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LATENCY))
    ops: Dict[str, Tuple[float, float]] = field(default_factory=dict)

    @classmethod
    def from_cluster(cls, links: Dict[str, float]) -> "Links":
        out = cls()
        for k, v in (links or {}).items():
            if k == "cross_site_latency_ms":
                out.latency["cross_site"] = float(v) / 1e3
            elif k in out.bandwidth:
                out.bandwidth[k] = float(v) * GB
        return out

    def apply_measured(self, measured: Dict[str, Sequence[float]], given: Optional[Dict[str, float]] = None
                       ) -> "Links":
        """Take measured figures (profile.measure_links: "kind" or "kind/op" -> [bytes/s, s]) for every
        link kind the cluster spec does not set itself (`given`: a simulated site's link stays as given)."""
        for key, (bw, lat) in measured.items():
            kind, _, op = key.partition("/")
            if kind in (given or {}) or kind not in self.bandwidth:
                continue
            if op:
                self.ops[key] = (float(bw), float(lat))
            else:
                self.bandwidth[kind], self.latency[kind] = float(bw), float(lat)
        return self

    def params(self, kind: str, op: str = "p2p") -> Tuple[float, float]:
        """(bytes/s, s per step) of collective `op` on a `kind` link, for the ring formulas below: the
        per-collective figure measured here when there is one, else the link's own."""
        return self.ops.get(f"{kind}/{op}") or (self.bandwidth[kind], self.latency[kind])

    def between(self, a: GroupSpec, b: GroupSpec, same_node: bool = False) -> str:
        """Kind of the link between a rank of `a` and a rank of `b`."""
        if a.site != b.site:
            return "cross_site"
        if a.domain != b.domain:
            return "cross_domain"
        return "intra_node" if same_node else "inter_node"

    def time(self, kind: str, nbytes: float, messages: int = 1) -> float:
        return nbytes / self.bandwidth[kind] + messages * self.latency[kind]


# -- parameters -------------------------------------------------------------------------------------
@dataclass
class ParamCount:
    """Elements held by one rank: `dense` (param dtype, reduced over dp), `expert` (param dtype, over
    expert-dp) and `fp32` (router weights, always fp32, reduced over dp)."""
    dense: int = 0
    expert: int = 0
    fp32: int = 0

    @property
    def total(self) -> int:
        return self.dense + self.expert + self.fp32

    def __add__(self, o: "ParamCount") -> "ParamCount":
        return ParamCount(self.dense + o.dense, self.expert + o.expert, self.fp32 + o.fp32)


def _mlp_params(spec: ModelSpec, ffn: int, tp: int) -> int:
    chunks = 2 if spec.swiglu else 1
    n = spec.hidden * ffn * chunks // tp + ffn // tp * spec.hidden
    if spec.bias:
        n += ffn * chunks // tp + spec.hidden  # fc1 bias sharded, fc2 (row-parallel) bias replicated
    return n


def layer_params(spec: ModelSpec, layer: int, tp: int, ep: int) -> ParamCount:
    """Elements of one transformer layer on one rank (matches models/transformer.py and moe/)."""
    h, d = spec.hidden, spec.kv_channels
    norms = 2 * h * (2 if spec.layernorm else 1)
    qkv = (spec.heads + 2 * spec.query_groups) * d
    attn = h * qkv // tp + spec.heads * d // tp * h + ((qkv // tp + h) if spec.bias else 0)
    if not spec.is_moe(layer):
        return ParamCount(dense=norms + attn + _mlp_params(spec, spec.ffn, tp))
    chunks = 2 if spec.swiglu else 1
    experts = spec.num_experts // ep * (h * chunks * spec.moe_ffn // tp + spec.moe_ffn // tp * h)
    shared = _mlp_params(spec, spec.shared_ffn, tp) if spec.shared_ffn else 0
    return ParamCount(dense=norms + attn + shared, expert=experts, fp32=spec.num_experts * h)


def stage_params(spec: ModelSpec, layers: Sequence[int], tp: int, ep: int, first: bool, last: bool,
                 pp: int) -> ParamCount:
    """Elements one rank of a pipeline stage holds: its layers, plus embedding / final norm / head."""
    total = ParamCount()
    for i in layers:
        total = total + layer_params(spec, i, tp, ep)
    h, vocab = spec.hidden, spec.padded_vocab(tp) // tp
    extra = 0
    if first:
        extra += vocab * h + (spec.max_positions * h if spec.learned_positions else 0)
    if last:
        extra += h * (2 if spec.layernorm else 1)
        if not spec.tied or not first:  # untied head, or the tied copy on the last stage
            extra += vocab * h
    return total + ParamCount(dense=extra)


# -- memory -----------------------------------------------------------------------------------------
@dataclass
class Memory:
    """Bytes per rank by kind; `total` is the predicted peak."""
    params: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    buffers: float = 0.0
    reserved: float = 0.0

    @property
    def states(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.states + self.activations + self.buffers + self.reserved

    def as_gb(self) -> Dict[str, float]:
        return {k: round(getattr(self, k) / GB, 4) for k in ("params", "grads", "optimizer", "activations",
                                                             "buffers", "reserved", "total")}


def state_bytes(spec: ModelSpec, count: ParamCount, dp: int, expert_dp: int, distributed_optimizer: bool
                ) -> Memory:
    """Parameters (their dtype; router fp32), fp32 main grads, fp32 masters + 2 Adam moments.

    bf16/fp16 parameters get a separate fp32 master; fp32 ones (and the router) are their own master.
    The distributed optimizer shards masters and moments over the data-parallel group (experts over
    the expert-data-parallel group), rounding each shard up as its buffers do.
    """
    params = (count.dense + count.expert) * spec.param_bytes + count.fp32 * 4
    grads = count.total * 4
    master = 4 if spec.param_bytes != 4 else 0

    def opt(low: int, fp32: int) -> float:  # elements in the param dtype, elements already fp32
        return low * (master + 8) + fp32 * 8

    if distributed_optimizer:
        optimizer = opt(math.ceil(count.dense / dp), math.ceil(count.fp32 / dp)) + opt(
            math.ceil(count.expert / max(expert_dp, 1)), 0)
    else:
        optimizer = opt(count.dense + count.expert, count.fp32)
    return Memory(params=params, grads=grads, optimizer=optimizer)


def activation_bytes_per_token(spec: ModelSpec, moe: bool, tp: int, recompute: Optional[str]) -> float:
    """Bytes one layer keeps for backward per token of a micro-batch (analytic, flash attention).

    Per Korthikanti et al. 2022 without dropout and with a fused attention that keeps no s x s matrix:
    norm inputs, linear inputs, q/k/v, attention output (+ fp32 log-sum-exp), fc1 output and activation
    output; hidden-sized tensors are split by TP only under sequence parallelism. MoE: router logits
    (fp32), permuted tokens and expert intermediates for the top-k copies, combine inputs.
    Full recompute keeps only the layer input.
    """
    b, h = spec.param_bytes, spec.hidden
    h_part = h / tp if (spec.sequence_parallel and tp > 1) else h
    if recompute == "full":
        return b * h_part
    qkv = (spec.heads + 2 * spec.query_groups) * spec.kv_channels
    attn_out = spec.heads * spec.kv_channels
    attn = b * (2 * h_part + (qkv + attn_out) / tp) + 4 * spec.heads / tp
    if recompute == "selective":
        attn -= b * attn_out / tp
    chunks = 2 if spec.swiglu else 1
    if not moe:
        return attn + b * (2 * h_part + (chunks + 1) * spec.ffn / tp)
    k = spec.topk
    routed = 4 * 2 * spec.num_experts + b * (2 * k * h + k * (chunks + 1) * spec.moe_ffn / tp)
    shared = b * (h_part + (chunks + 1) * spec.shared_ffn / tp) if spec.shared_ffn else 0.0
    return attn + b * 2 * h_part + routed + shared


def head_bytes_per_token(spec: ModelSpec, tp: int) -> float:
    """Last stage: logits [s, b, v/tp] in the param dtype, kept by the in-place vocab-parallel loss."""
    return spec.padded_vocab(tp) / tp * max(spec.param_bytes, 4)


def moe_buffer_bytes(spec: ModelSpec, tokens: int) -> float:
    """All-to-all send and receive buffers of one MoE layer for `tokens` tokens (transient)."""
    return 2 * tokens * spec.topk * spec.hidden * spec.param_bytes if spec.num_experts else 0.0


# -- compute ----------------------------------------------------------------------------------------
def layer_flops(spec: ModelSpec, moe: bool) -> float:
    """Forward FLOPs of one layer for one token (flops.py's training count / 3)."""
    return transformer_flops_per_token(
        1, spec.hidden, spec.ffn, spec.heads, spec.query_groups, spec.seq, 0, spec.swiglu,
        spec.num_experts if moe else None, spec.topk, spec.moe_ffn or None, spec.shared_ffn or None,
        [True] if moe else None) / 3.0


def head_flops(spec: ModelSpec) -> float:
    return 2.0 * spec.hidden * spec.vocab


@dataclass
class StageTimes:
    """Seconds for one micro-batch on one rank of a stage (chunk-level sums)."""
    fwd: float
    bwd: float


def shard_key(what: str, tp: int, ep: int = 1) -> str:
    """The profile key of a rank's shard of `what` at TP `tp` and (MoE layers only) EP `ep`, as
    profile.load_or_measure_shards_together times it with its peers: "dense@tp2", "moe@ep2",
    "moe@tp2ep2"; `what` itself for an unsharded piece."""
    degrees = (f"tp{tp}" if tp > 1 else "") + (f"ep{ep}" if ep > 1 and what == "moe" else "")
    return f"{what}@{degrees}" if degrees else what


def shard_measured(group: GroupSpec, what: str, tp: int, ep: int = 1) -> bool:
    """Whether the group's profile timed its TP-`tp` (EP-`ep` for a MoE layer) shard of `what` with its
    peers (profile.load_or_measure_shards_together): then that time, the shard's TP and EP collectives
    included, replaces the layer's time / tp plus the link model's collectives."""
    key = shard_key(what, tp, ep)
    prof = group.profile
    return "@" in key and prof is not None and hasattr(prof, "measured") and prof.measured(key)


def compute_time(group: GroupSpec, spec: ModelSpec, what: str, mbs: int, tp: int, ep: int = 1) -> StageTimes:
    """Forward / backward seconds of `what` ('dense', 'moe', 'embed', 'head') for one micro-batch.

    With a profile (backends present) the measured time at this micro-batch size is used: the shard's
    own where it was timed at this TP (and, for a MoE layer, EP) degree, collectives included, else the
    layer's split over the TP ranks; otherwise FLOPs / (peak x efficiency). Backward is 2x forward for
    FLOP-based estimates. Without a measured shard, EP does not change a rank's compute (it runs its
    experts on every rank's tokens routed to them: on average as many as its own tokens would give).
    """
    prof = group.profile
    if prof is not None:
        if shard_measured(group, what, tp, ep):  # timed with its peers, its collectives included
            fwd, bwd = prof.time(shard_key(what, tp, ep), mbs)
            return StageTimes(fwd / group.speed, bwd / group.speed)
        fwd, bwd = prof.time(what, mbs)
        scale = 1.0 / (group.speed * (tp if what != "embed" else 1))
        return StageTimes(fwd * scale, bwd * scale)
    tokens = mbs * spec.seq
    if what == "embed":
        return StageTimes(0.0, 0.0)
    flops = head_flops(spec) if what == "head" else layer_flops(spec, what == "moe")
    rate = group.peak_tflops * 1e12 * group.efficiency * tp_efficiency(spec, tp)
    fwd = flops * tokens / tp / rate
    if what != "head":
        fwd += tokens * elementwise_bytes_per_token(spec, tp) / group.memory_bandwidth
    return StageTimes(fwd, 2.0 * fwd)


def recompute_time(group: GroupSpec, spec: ModelSpec, what: str, mbs: int, tp: int, ep: int = 1) -> StageTimes:
    """Forward / backward seconds of a fully recomputed `what` layer for one micro-batch: measured where
    the profile timed a checkpointed layer (its forward and its backward's recompute both cost more than
    a plain layer's: +8-14% for the whole here), else the plain layer with one more forward in backward."""
    t = compute_time(group, spec, what, mbs, tp, ep)
    prof = group.profile
    measured = prof.recompute_time(what, mbs) if prof is not None and hasattr(prof, "recompute_time") else None
    if measured is None:
        return StageTimes(t.fwd, t.bwd + t.fwd)
    # The measured checkpoint ratios applied to compute_time's answer, so a shard timed with its peers
    # (shard_measured) is recomputed from its own time, not from the layer's / tp.
    f, b = prof.time(what, mbs)
    ratio_fwd, ratio_all = measured[0] / f, (measured[0] + measured[1]) / (f + b)
    return StageTimes(t.fwd * ratio_fwd, (t.fwd + t.bwd) * ratio_all - t.fwd * ratio_fwd)


def elementwise_bytes_per_token(spec: ModelSpec, tp: int) -> float:
    """Memory traffic of a layer's non-GEMM forward ops per token (bandwidth-bound, so not in FLOPs).

    Norms, residual adds, bias/activation and dropout read and write about 10 hidden-sized tensors
    (split by TP only under sequence parallelism) and 3 ffn-sized ones per token; without a fused
    attention kernel, scale/mask/softmax/dropout pass over the [s] scores of every local head ~5 times.
    """
    h_part = spec.hidden / tp if spec.sequence_parallel and tp > 1 else spec.hidden
    ffn = spec.ffn if not spec.num_experts else spec.topk * spec.moe_ffn + spec.shared_ffn
    elems = 2 * (10 * h_part + 3 * ffn / tp)
    if not spec.flash_attention:
        elems += 5 * spec.heads / tp * spec.seq
    return elems * spec.param_bytes


def tp_efficiency(spec: ModelSpec, tp: int) -> float:
    """GEMMs get narrower with TP: efficiency h_local / (h_local + 256) relative to tp=1."""
    def eff(t):
        local = spec.hidden / t
        return local / (local + 256.0)
    return eff(tp) / eff(1)


# -- communication ----------------------------------------------------------------------------------
def ring_allreduce_time(nbytes: float, n: int, bw: float, lat: float) -> float:
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * lat


def ring_half_time(nbytes: float, n: int, bw: float, lat: float) -> float:
    """Reduce-scatter or all-gather of `nbytes` total."""
    if n <= 1:
        return 0.0
    return (n - 1) / n * nbytes / bw + (n - 1) * lat


def alltoall_time(nbytes: float, n: int, bw: float, lat: float) -> float:
    if n <= 1:
        return 0.0
    return (n - 1) / n * nbytes / bw + (n - 1) * lat


def tp_comm_time(spec: ModelSpec, group: GroupSpec, links: Links, mbs: int, tp: int, layers: int) -> float:
    """Forward + backward TP collectives of `layers` layers for one micro-batch (not overlapped).

    Two all-reduces per layer forward (after the attention projection and the second MLP linear) and
    two in backward (input gradients of the QKV and first MLP linears), of the [s, b, h] activation;
    under sequence parallelism each becomes an all-gather and a reduce-scatter of the same bytes. TP
    stays inside a node.
    """
    if tp <= 1 or layers == 0:
        return 0.0
    nbytes = mbs * spec.seq * spec.hidden * spec.param_bytes
    if group.profile is not None and getattr(group.profile, "links", None):
        bw, lat = group.profile.link("intra_node", *links.params("intra_node"))
        return 4 * layers * ring_allreduce_time(nbytes, tp, bw, lat)
    if spec.sequence_parallel:
        one = ring_half_time(nbytes, tp, *links.params("intra_node", "all_gather")) + ring_half_time(
            nbytes, tp, *links.params("intra_node", "reduce_scatter"))
    else:
        one = ring_allreduce_time(nbytes, tp, *links.params("intra_node", "all_reduce"))
    return 4 * layers * one


def ep_comm_time(spec: ModelSpec, group: GroupSpec, links: Links, mbs: int, tp: int, ep: int,
                 moe_layers: int) -> float:
    """Dispatch + combine all-to-all, forward and backward, of `moe_layers` MoE layers, one micro-batch,
    plus the all-gather of per-expert counts that sizes each forward dispatch (moe/dispatcher.py):
    five collectives per layer, the last one latency-bound."""
    if ep <= 1 or moe_layers == 0:
        return 0.0
    tokens = mbs * spec.seq / (tp if spec.sequence_parallel else 1)
    nbytes = tokens * spec.topk * spec.hidden * spec.param_bytes
    kind = "intra_node" if ep * tp <= group.devices_per_node else "inter_node"
    counts = ring_half_time(ep * spec.num_experts * 8, ep, *links.params(kind, "all_gather"))  # E int64 each
    return moe_layers * (4 * alltoall_time(nbytes, ep, *links.params(kind, "all_to_all")) + counts)


def small_allreduce_time(n: int, lat: float) -> float:
    """A latency-bound all-reduce of a few bytes over `n` ranks: a reduction tree up and down
    (2 log2 n steps; equals the ring's 2 steps at n = 2)."""
    return 2 * math.ceil(math.log2(n)) * lat if n > 1 else 0.0


def step_collectives_time(groups: Sequence[GroupSpec], world: int, links: Links, dp: int) -> float:
    """The scalar all-reduces every step makes besides the model's (training/train_step.py, grad_norm.py):
    the gradient norm and the logged loss over the world, and the global token count over the `dp`
    replicas (none with one replica); each as slow as the slowest link kind the world spans
    (host-staged through the bridge across domains)."""
    if world <= 1:
        return 0.0
    count = 2 + (1 if dp > 1 else 0)
    sites = {g.site for g in groups}
    domains = {g.domain for g in groups}
    if len(sites) > 1:
        kind = "cross_site"
    elif len(domains) > 1:
        kind = "cross_domain"
    else:
        kind = "intra_node" if world <= min(g.devices_per_node for g in groups) else "inter_node"
    return count * small_allreduce_time(world, links.params(kind, "all_reduce")[1])


def p2p_bytes(spec: ModelSpec, mbs: int) -> float:
    """Activation (or its gradient) sent between stages per micro-batch: [s, b, h]."""
    return mbs * spec.seq * spec.hidden * spec.param_bytes


def dp_reduce_time(grad_bytes: float, members: Sequence[GroupSpec], counts: Sequence[int], links: Links,
                   tp: int, distributed_optimizer: bool, param_bytes: float) -> float:
    """Gradient reduction of one rank's `grad_bytes` over a data-parallel group, hierarchical.

    Members are grouped by (site, domain): native reduce-scatter inside each, the shards reduced across
    domains/sites over the slowest crossing link, native all-gather back (the bridge's hierarchy). With
    the distributed optimizer the last all-gather moves parameters (param dtype) instead of gradients.
    """
    n = sum(counts)
    if n <= 1:
        return 0.0
    parts: Dict[tuple, int] = {}
    for g, c in zip(members, counts):
        parts[(g.site, g.domain)] = parts.get((g.site, g.domain), 0) + c
    gather_bytes = grad_bytes * (param_bytes / 4.0) if distributed_optimizer else grad_bytes
    inner = 0.0
    for g, c in zip(members, counts):
        kind = "intra_node" if c * tp <= g.devices_per_node else "inter_node"
        if len(parts) == 1 and not distributed_optimizer:  # one library's all-reduce (data_parallel.py)
            t = ring_allreduce_time(grad_bytes, c, *links.params(kind, "all_reduce"))
        else:
            t = ring_half_time(grad_bytes, c, *links.params(kind, "reduce_scatter")) + ring_half_time(
                gather_bytes, c, *links.params(kind, "all_gather"))
        inner = max(inner, t)
    if len(parts) == 1:
        return inner
    sites = {s for s, _ in parts}
    cross = "cross_site" if len(sites) > 1 else "cross_domain"
    smallest = min(parts.values())
    shard = grad_bytes / smallest
    # Shards cross as host-staged point-to-point messages (hierarchical.py), hence the link's own figures.
    return inner + ring_allreduce_time(shard, len(parts), links.bandwidth[cross], links.latency[cross])


def optimizer_time(group: GroupSpec, params_local: float) -> float:
    """Adam step over this rank's (possibly sharded) parameters: memory-bound."""
    prof = group.profile
    if prof is not None and getattr(prof, "optimizer_s_per_param", None):
        # The sim backend stretches forward/backward chunks only; its optimizer runs at CPU speed.
        slow = 1.0 if group.backend == "sim" else group.speed
        return prof.optimizer_s_per_param * params_local / slow
    return ADAM_BYTES_PER_PARAM * params_local / group.memory_bandwidth


def with_overrides(group: GroupSpec, **kw) -> GroupSpec:
    return replace(group, **kw)


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise MegahetError(msg)
