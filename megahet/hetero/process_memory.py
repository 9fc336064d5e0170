"""Memory a training process holds outside the model's tensors, measured on the backends present.

A CPU rank's budget is host memory, and a training process allocates more than the model's
parameters, gradients, optimizer state and activations: start-up buffers (the peak-FLOP/s probe's
matrices), the math libraries' caches, the data pipeline, the Python objects of what training imports.
That part does not grow with the model (about 77 MB here for the planner bench's model at 4, 8 and
16 layers). `runtime_overhead` trains a one-layer version of the job's model for two steps in a fresh
process (glibc set to return large blocks at free, so resident memory follows live allocations:
memory_probe) and subtracts what the cost model predicts for that one-layer model from the rise of
its anonymous resident memory. The planner charges the result on every cpu/sim rank as
`Memory.reserved` (GPU/NPU ranks get `cost_model.RESERVED_GB` instead: CUDA context, NCCL/HCCL
buffers). Cached per (model shape without the layer count, micro-batch, dtype, torch version).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from typing import Optional

import torch

from megahet.errors import MegahetError

PROBE_STEPS = 2


def probe_overrides(cfg) -> dict:
    """Config overrides of the one-layer probe job: the model's shape, one stage, one rank, mock data."""
    m, t = cfg.model, cfg.train
    keep = dict(hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size, num_attention_heads=m.num_attention_heads,
                num_query_groups=m.num_query_groups, seq_length=m.seq_length, vocab_size=m.vocab_size or 32000,
                swiglu=m.swiglu, normalization=m.normalization, position_embedding_type=m.position_embedding_type,
                untie_embeddings_and_output_weights=m.untie_embeddings_and_output_weights,
                disable_bias_linear=m.disable_bias_linear, num_experts=m.num_experts, moe_router_topk=m.moe_router_topk,
                moe_ffn_hidden_size=m.moe_ffn_hidden_size, bf16=t.bf16, fp16=t.fp16)
    keep = {k: v for k, v in keep.items() if v is not None}
    return {**keep, "num_layers": 1, "micro_batch_size": t.micro_batch_size, "global_batch_size": t.micro_batch_size,
            "mock_data": True, "train_iters": PROBE_STEPS, "log_interval": 1, "eval_interval": 100000}


def predicted_model_bytes(cfg) -> float:
    """Cost-model bytes of the probe's one-layer model on one rank: states, activations of one
    micro-batch (analytic), the head's logits."""
    from megahet.hetero import cost_model as cm
    spec = cm.ModelSpec.from_config(cfg)
    count = cm.stage_params(spec, [0], 1, 1, True, True, 1)
    mem = cm.state_bytes(spec, count, 1, 1, False)
    tokens = cfg.train.micro_batch_size * spec.seq
    act = tokens * (cm.activation_bytes_per_token(spec, spec.is_moe(0), 1, None) + cm.head_bytes_per_token(spec, 1)
                    + spec.hidden * spec.param_bytes)
    return mem.states + act + cm.moe_buffer_bytes(spec, tokens)


def _cache_path(overrides: dict) -> str:
    from megahet.hetero.profile import cache_dir
    text = json.dumps([overrides, torch.__version__], sort_keys=True, default=str)
    return os.path.join(cache_dir(), f"process-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json")


def cached_overhead(cfg) -> Optional[float]:
    """runtime_overhead(cfg) when it has been measured before (free), else None."""
    return _read_overhead(_cache_path(probe_overrides(cfg)))


def _read_overhead(path: str) -> Optional[float]:
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            return float(json.load(fh)["runtime_overhead_bytes"])
    except (OSError, ValueError, KeyError):
        return None


def runtime_overhead(cfg, *, use_cache: bool = True, timeout: float = 300.0) -> float:
    """Bytes a cpu rank training `cfg`'s model holds outside the model (see the module docstring).

    The first time per model shape it trains the one-layer probe: ~4-6 s here, mostly the fresh
    interpreter's imports (autoplan charges it at job start only where it can matter)."""
    from megahet.config import build_config
    from megahet.hetero.profile import cache_dir
    overrides = probe_overrides(cfg)
    path = _cache_path(overrides)
    hit = _read_overhead(path) if use_cache else None
    if hit is not None:
        return hit
    env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "GROUP_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    # A fresh interpreter (not multiprocessing): works from daemonic ranks too, and starts clean.
    proc = subprocess.run([sys.executable, "-m", "megahet.hetero.process_memory", json.dumps(overrides)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("rise_bytes=")]
    if proc.returncode or not lines:
        raise MegahetError(f"process memory probe failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}; "
                           "check that a one-rank training run works here (examples/pretrain_gpt.py --mock-data)")
    rise = float(lines[-1].split("=", 1)[1])
    overhead = max(rise - predicted_model_bytes(build_config(overrides=overrides, validate=False)), 0.0)
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = path + ".partial"
    with open(tmp, "w") as fh:
        json.dump({"runtime_overhead_bytes": overhead, "rise_bytes": rise, "probe": overrides}, fh, indent=1)
    os.replace(tmp, path)
    return overhead


def _probe(overrides: dict) -> int:
    """In the fresh probe process: the rise of anonymous resident memory while training the probe job."""
    from megahet.memory_probe import PeakSampler, exact_malloc_accounting
    exact_malloc_accounting()  # before anything large is allocated
    from megahet.config import build_config
    from megahet.training.pretrain import pretrain
    cfg = build_config(overrides=overrides)
    with PeakSampler() as sampler:
        pretrain(cfg)
    return sampler.extra


if __name__ == "__main__":
    sys.stdout.write(f"rise_bytes={_probe(json.loads(sys.argv[1]))}\n")
