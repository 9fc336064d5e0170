"""One typed config tree for a training job.

YAML files are loaded strictly (an unknown key is an error naming the closest valid key) and
Megatron-style command-line flags, derived from the field names (`num_layers` -> `--num-layers`),
override them. Every field name is unique across sections so a flag maps to exactly one field.
`validate()` checks cross-field constraints and raises one-line errors that name the flags and the fix.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Optional

import yaml

from megahet.errors import MegahetError


def _f(default, help: str, **kw):
    """A dataclass field carrying its documentation (shown in --help)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    """Architecture of the transformer (dense or MoE)."""
    num_layers: int = _f(4, "Number of transformer layers.")
    hidden_size: int = _f(256, "Transformer hidden size.")
    ffn_hidden_size: Optional[int] = _f(None, "Dense MLP hidden size (default 4*hidden, or 8/3*hidden rounded to 64 with SwiGLU).")
    num_attention_heads: int = _f(4, "Number of query attention heads.")
    num_query_groups: Optional[int] = _f(None, "Key/value heads for grouped-query attention (default: = heads).")
    group_query_attention: bool = _f(False, "Use grouped-query attention with --num-query-groups kv heads.")
    kv_channels: Optional[int] = _f(None, "Per-head dimension (default hidden/heads).")
    seq_length: int = _f(256, "Sequence length of a training sample.")
    max_position_embeddings: Optional[int] = _f(None, "Maximum positions (default: seq-length).")
    vocab_size: Optional[int] = _f(None, "Vocabulary size (NullTokenizer / mock data; otherwise taken from the tokenizer).")
    make_vocab_size_divisible_by: int = _f(128, "Pad the vocabulary to a multiple of this (padded logits are masked).")
    normalization: str = _f("RMSNorm", "Normalization layer.", choices=["RMSNorm", "LayerNorm"])
    norm_epsilon: float = _f(1e-5, "Epsilon of the normalization layers.")
    swiglu: bool = _f(True, "SwiGLU MLP (otherwise GeLU).")
    position_embedding_type: str = _f("rope", "Position embedding.", choices=["rope", "learned_absolute"])
    rotary_base: float = _f(10000.0, "RoPE base frequency.")
    use_rope_scaling: bool = _f(False, "Llama 3 RoPE frequency scaling (HF rope_scaling type llama3).")
    rope_scaling_factor: float = _f(8.0, "Llama 3 RoPE scaling factor.")
    rope_scaling_low_freq_factor: float = _f(1.0, "Llama 3 RoPE scaling low-frequency factor.")
    rope_scaling_high_freq_factor: float = _f(4.0, "Llama 3 RoPE scaling high-frequency factor.")
    rope_scaling_original_max_position_embeddings: int = _f(8192, "Context length the Llama 3 RoPE scaling is relative to.")
    qk_layernorm: bool = _f(False, "Normalize each query and key head (per-head norm over kv-channels, Qwen3).")
    untie_embeddings_and_output_weights: bool = _f(False, "Separate input embedding and output layer weights.")
    disable_bias_linear: bool = _f(True, "No biases in linear layers (Llama style).")
    init_method_std: float = _f(0.02, "Standard deviation of weight initialisation.")
    # Mixture of experts.
    num_experts: Optional[int] = _f(None, "Number of routed experts (None: dense model).")
    moe_router_topk: int = _f(2, "Experts per token.")
    moe_ffn_hidden_size: Optional[int] = _f(None, "Hidden size of each routed expert (default ffn-hidden-size).")
    moe_shared_expert_intermediate_size: Optional[int] = _f(None, "Hidden size of the shared expert (None: no shared expert).")
    moe_layer_freq: object = _f(1, "Every N-th layer is MoE (layer % N == 0), or a 0/1 per layer such as [0,1,1,1] or ([0]+[1]*3).", kind="layerfreq")
    moe_router_score_function: str = _f("softmax", "Router scores.", choices=["softmax", "sigmoid"])
    moe_router_pre_softmax: bool = _f(False, "Softmax over all experts before top-k (Mixtral routing is top-k then softmax).")
    moe_router_num_groups: Optional[int] = _f(None, "Expert groups for group-limited routing.")
    moe_router_group_topk: Optional[int] = _f(None, "Groups selected per token in group-limited routing.")
    moe_router_topk_scaling_factor: Optional[float] = _f(None, "Scale of the top-k weights.")
    moe_aux_loss_coeff: float = _f(0.0, "Coefficient of the load-balancing auxiliary loss.")
    moe_z_loss_coeff: float = _f(0.0, "Coefficient of the router z-loss.")
    moe_router_enable_expert_bias: bool = _f(False, "Aux-loss-free balancing: per-expert bias updated from load.")
    moe_router_bias_update_rate: float = _f(1e-3, "Update rate of the expert bias.")
    moe_expert_capacity_factor: Optional[float] = _f(None, "Capacity factor with token dropping (None: dropless).")
    moe_token_dispatcher_type: str = _f("alltoall", "Token dispatcher.", choices=["alltoall", "allgather"])


@dataclass
class ParallelConfig:
    """How the model and the batch are split across ranks."""
    tensor_model_parallel_size: int = _f(1, "Tensor-parallel degree.")
    pipeline_model_parallel_size: int = _f(1, "Pipeline-parallel degree.")
    expert_model_parallel_size: int = _f(1, "Expert-parallel degree.")
    sequence_parallel: bool = _f(False, "Sequence parallelism inside tensor-parallel regions.")
    pipeline_layers: Optional[list] = _f(None, "Layers per pipeline stage, e.g. 5,3,4 (default: even).", kind="intlist")
    num_layers_per_virtual_pipeline_stage: Optional[int] = _f(None, "Layers per virtual stage (interleaved 1F1B).")
    pipeline_schedule: str = _f("auto", "Pipeline schedule.", choices=["auto", "afab", "1f1b", "interleaved"])
    use_distributed_optimizer: bool = _f(False, "Shard fp32 master weights and optimizer state across data parallel (ZeRO-1).")
    overlap_grad_reduce: bool = _f(False, "Reduce gradient buckets while backward still runs.")
    ddp_bucket_size: int = _f(4_000_000, "Elements per gradient bucket.")
    distributed_timeout_s: float = _f(600.0, "Timeout of collectives (seconds).")


@dataclass
class TrainConfig:
    """Optimisation and the training loop."""
    micro_batch_size: int = _f(4, "Samples per micro-batch.")
    global_batch_size: int = _f(16, "Samples per optimizer step over all replicas.")
    train_iters: Optional[int] = _f(None, "Optimizer steps to train.")
    train_samples: Optional[int] = _f(None, "Samples to train (alternative to --train-iters).")
    lr: float = _f(3e-4, "Peak learning rate.")
    min_lr: float = _f(3e-5, "Learning rate at the end of decay.")
    lr_decay_style: str = _f("cosine", "Decay after warmup.", choices=["cosine", "linear", "constant"])
    lr_warmup_iters: int = _f(0, "Warmup steps.")
    lr_warmup_fraction: Optional[float] = _f(None, "Warmup as a fraction of decay steps.")
    lr_decay_iters: Optional[int] = _f(None, "Decay steps (default: train iters).")
    weight_decay: float = _f(0.1, "AdamW weight decay (not applied to norms and biases).")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.95, "Adam beta2.")
    adam_eps: float = _f(1e-8, "Adam epsilon.")
    clip_grad: float = _f(1.0, "Clip the global gradient norm to this (0: off).")
    optimizer_implementation: str = _f("auto", "AdamW kernel: auto (fused where the device has it, else foreach), "
                                       "fused, foreach or for-loop.", choices=["auto", "fused", "foreach", "for-loop"])
    gradient_accumulation_fusion: bool = _f(True, "Linear layers write weight gradients straight into the fp32 "
                                            "gradient buffer (Megatron); --no-gradient-accumulation-fusion: via .grad.")
    compile: bool = _f(False, "torch.compile each transformer layer (where the backend supports it).")
    host_allocator: str = _f("default", "CPU ranks: 'retain' keeps freed host memory in the process (glibc "
                             "mallopt: no mmap, no trim) instead of page-faulting it back every step.",
                             choices=["default", "retain"])
    bf16: bool = _f(False, "bf16 parameters and compute with fp32 master weights.")
    fp16: bool = _f(False, "fp16 parameters and compute with dynamic loss scaling.")
    tf32: bool = _f(False, "Let fp32 matmuls use TF32 tensor cores on CUDA (Ampere and newer; PyTorch's default "
                    "is off). fp32 MFU counts against the TF32 peak only when set, else the fp32 peak.")
    loss_scale: Optional[float] = _f(None, "Constant loss scale for fp16 (default dynamic).")
    initial_loss_scale: float = _f(2.0 ** 16, "Initial dynamic loss scale.")
    seed: int = _f(1234, "Random seed (weights and data order; the model has no dropout).")
    eval_interval: int = _f(1000, "Evaluate every N steps.")
    eval_iters: int = _f(10, "Batches per evaluation.")
    exit_interval: Optional[int] = _f(None, "Exit (after saving) when iteration % N == 0.")
    exit_duration_in_mins: Optional[float] = _f(None, "Exit (after saving) after this many minutes.")
    max_skipped_steps: int = _f(10, "Stop when this many consecutive steps had NaN/Inf loss or gradients.")
    recompute_granularity: Optional[str] = _f(None, "Activation recomputation.", choices=[None, "full", "selective"])
    recompute_method: Optional[str] = _f(None, "Which layers recompute (full).", choices=[None, "uniform", "block"])
    recompute_num_layers: int = _f(1, "Layers per recompute unit (uniform) or recomputed layers per stage (block).")


@dataclass
class DataConfig:
    """Where samples come from."""
    data_path: Optional[list] = _f(None, "Dataset prefixes, optionally weighted: 0.7 A 0.3 B.", kind="strlist")
    split: str = _f("969,30,1", "Train,valid,test split of each dataset's sequences (Megatron's default).")
    train_data_path: Optional[list] = _f(None, "Training blend used instead of --data-path/--split.", kind="strlist")
    valid_data_path: Optional[list] = _f(None, "Validation blend used instead of --data-path/--split.", kind="strlist")
    test_data_path: Optional[list] = _f(None, "Test blend used instead of --data-path/--split.", kind="strlist")
    mock_data: bool = _f(False, "Deterministic synthetic tokens, no files.")
    tokenizer_type: str = _f("SentencePieceTokenizer", "Tokenizer.",
                             choices=["SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer"])
    tokenizer_model: Optional[str] = _f(None, "SentencePiece model file, or a Hugging Face tokenizer directory / tokenizer.json.")
    data_cache_path: Optional[str] = _f(None, "Where sample indices and the built-in corpus are cached (default ~/.cache/megahet).")
    builtin_vocab_size: int = _f(8000, "Vocabulary of the tokenizer trained on the built-in corpus.")
    eod_mask_loss: bool = _f(False, "Mask the loss of end-of-document tokens.")


@dataclass
class CheckpointConfig:
    """Saving and resuming."""
    save: Optional[str] = _f(None, "Checkpoint directory to write.")
    load: Optional[str] = _f(None, "Checkpoint directory to resume from (latest complete checkpoint).")
    save_interval: Optional[int] = _f(None, "Save every N steps (and at the end).")
    keep_last: Optional[int] = _f(None, "Keep only the last K checkpoints.")
    finetune: bool = _f(False, "Load weights only; reset optimizer, iteration and data position.")
    load_fallback: bool = _f(False, "If the newest checkpoint under --load is damaged, load the previous complete one.")
    async_save: bool = _f(False, "Copy checkpoints to host memory and write them in the background while training continues.")


@dataclass
class LoggingConfig:
    """Metrics and logs."""
    log_interval: int = _f(10, "Log every N steps.")
    metrics_file: Optional[str] = _f(None, "JSONL file with one object per logged step.")
    wandb_project: Optional[str] = _f(None, "wandb project (offline unless an API key is configured).")
    wandb_exp_name: Optional[str] = _f(None, "wandb run name.")
    wandb_save_dir: Optional[str] = _f(None, "wandb directory.")
    tensorboard_dir: Optional[str] = _f(None, "TensorBoard log directory.")
    timing_trace: Optional[str] = _f(None, "Write a Chrome trace of the pipeline schedule of the last step here.")


@dataclass
class HeteroConfig:
    """Mixed-hardware placement."""
    cluster: Optional[str] = _f(None, "Cluster spec YAML (device groups, backends, links).")
    plan: Optional[str] = _f(None, "Plan YAML (default: chosen automatically from the cluster).")
    backend: Optional[str] = _f(None, "Backend of every rank when no cluster is given (default: best available).")
    straggler_threshold: float = _f(1.5, "Report a rank whose compute time exceeds this multiple of the median.")
    rebalance: bool = _f(False, "Move micro-batches between data-parallel replicas when their measured speeds drift.")
    elastic: bool = _f(False, "Run on the cluster groups still present (a rank's group: $MEGAHET_DEVICE_GROUP), "
                              "re-planned when some were lost; resume from --load.")


@dataclass
class MegahetConfig:
    """The whole job."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    hetero: HeteroConfig = field(default_factory=HeteroConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = [f.name for f in dataclasses.fields(MegahetConfig)]


def _section_types() -> dict:
    hints = typing.get_type_hints(MegahetConfig)
    return {name: hints[name] for name in SECTIONS}


def field_index() -> dict:
    """Map field name -> (section, dataclasses.Field, resolved type)."""
    out = {}
    for section, cls in _section_types().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.name not in out, f"duplicate config field {f.name}"
            out[f.name] = (section, f, hints[f.name])
    return out


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def _base_type(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is typing.Union and args else tp


def _coerce(name: str, value, tp, meta):
    """Convert a YAML/CLI value to the field's type, with a clear error."""
    if value is None:
        return None
    base = _base_type(tp)
    kind = meta.get("kind")
    try:
        if kind == "layerfreq":
            return parse_layer_freq(value)
        if kind == "intlist":
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            return [int(v) for v in value]
        if kind == "strlist":
            if isinstance(value, str):
                value = value.split()
            return [str(v) for v in value]
        if base is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
    except (TypeError, ValueError):
        raise MegahetError(f"config field '{name}' got {value!r}, which is not a valid {getattr(base, '__name__', base)}; "
                           f"fix --{name.replace('_', '-')}") from None
    return value


def parse_layer_freq(value):
    """--moe-layer-freq: an int N, or a 0/1 list given as a list, "[0,1,1]" or Megatron's "([0]+[1]*3)"."""
    if isinstance(value, str):
        try:
            value = _list_expression(ast.parse(value.strip(), mode="eval").body)
        except SyntaxError:
            raise ValueError(value) from None
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)) and all(v in (0, 1) and not isinstance(v, bool) for v in value):
        return [int(v) for v in value]
    raise ValueError(value)


def _list_expression(node):
    """Evaluate ints, lists of ints, + and * only (Megatron writes patterns as python expressions)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_list_expression(e) for e in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _list_expression(node.left), _list_expression(node.right)
        return left + right if isinstance(node.op, ast.Add) else left * right
    raise ValueError("not a layer pattern")


def load_yaml(path: str) -> dict:
    """Read a YAML config into {section: {field: value}}, strictly."""
    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise MegahetError(f"config file {path} not found; pass an existing --config FILE") from None
    except yaml.YAMLError as exc:
        raise MegahetError(f"config file {path} is not valid YAML ({str(exc).splitlines()[0]}); fix its syntax") from None
    if not isinstance(raw, dict):
        raise MegahetError(f"config file {path} must hold a mapping of sections ({', '.join(SECTIONS)})")
    index = field_index()
    out: dict = {}
    for key, value in raw.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise MegahetError(f"section '{key}' in {path} must be a mapping of fields")
            valid = {n for n, (s, _, _) in index.items() if s == key}
            for name, v in value.items():
                if name not in valid:
                    raise MegahetError(f"unknown key '{key}.{name}' in {path}{_closest(name, valid)}")
                out.setdefault(key, {})[name] = v
        elif key in index:  # flat keys are accepted too: every field name is unique
            out.setdefault(index[key][0], {})[key] = value
        else:
            raise MegahetError(f"unknown key '{key}' in {path}{_closest(key, list(index) + SECTIONS)}")
    return out


def build_arg_parser() -> argparse.ArgumentParser:
    """Megatron-style flags, one per config field (defaults None so only given flags override)."""
    parser = argparse.ArgumentParser(description="megahet training", allow_abbrev=False)
    parser.add_argument("--config", default=None, help="YAML config file; flags override it.")
    for section, cls in _section_types().items():
        grp = parser.add_argument_group(section, cls.__doc__)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            meta = f.metadata
            base = _base_type(hints[f.name])
            kw: dict = {"default": None, "dest": f.name, "help": meta.get("help", "").replace("%", "%%")}
            if meta.get("kind") == "strlist":
                kw["nargs"] = "+"
            elif base is bool:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["type"] = str if meta.get("kind") in ("intlist", "layerfreq") else base
                if "choices" in meta:
                    kw["choices"] = [c for c in meta["choices"] if c is not None]
            grp.add_argument(flag, **kw)
    return parser


def build_config(overrides: Optional[dict] = None, yaml_path: Optional[str] = None,
                 args: Optional[argparse.Namespace] = None, validate: bool = True) -> MegahetConfig:
    """Defaults <- YAML <- CLI flags <- `overrides` ({field: value}, flat), then validation."""
    index = field_index()
    values: dict = {}
    if yaml_path:
        for section, fields in load_yaml(yaml_path).items():
            values.update(fields)
    if args is not None:
        for name in index:
            v = getattr(args, name, None)
            if v is not None:
                values[name] = v
    for name, v in (overrides or {}).items():
        if name not in index:
            raise MegahetError(f"unknown config field '{name}'{_closest(name, index)}")
        values[name] = v
    cfg = MegahetConfig()
    for name, v in values.items():
        section, f, tp = index[name]
        v = _coerce(name, v, tp, f.metadata)
        choices = f.metadata.get("choices")
        if choices and v not in choices:
            raise MegahetError(f"--{name.replace('_', '-')} must be one of {[c for c in choices if c is not None]}, got {v!r}")
        setattr(getattr(cfg, section), name, v)
    cfg.explicit_fields = frozenset(values)  # given in YAML, flags or overrides (not a field: never saved)
    finalize(cfg)
    if validate:
        validate_config(cfg)
    return cfg


def parse_args(argv=None) -> MegahetConfig:
    """Parse command-line flags (and --config YAML) into a validated config."""
    args = build_arg_parser().parse_args(argv)
    return build_config(yaml_path=args.config, args=args)


def finalize(cfg: MegahetConfig) -> None:
    """Fill derived defaults (ffn size, positions, query groups, recompute method, mock vocabulary)."""
    m, t, d = cfg.model, cfg.train, cfg.data
    if m.ffn_hidden_size is None:
        if m.swiglu:
            m.ffn_hidden_size = int(((8 * m.hidden_size // 3) + 63) // 64 * 64)
        else:
            m.ffn_hidden_size = 4 * m.hidden_size
    if m.max_position_embeddings is None:
        m.max_position_embeddings = m.seq_length
    if m.num_query_groups is not None and m.num_query_groups != m.num_attention_heads:
        m.group_query_attention = True
    if not m.group_query_attention:
        m.num_query_groups = m.num_attention_heads
    elif m.num_query_groups is None:
        raise MegahetError("--group-query-attention needs --num-query-groups N (the number of key/value heads)")
    if m.kv_channels is None and m.num_attention_heads > 0:
        m.kv_channels = m.hidden_size // m.num_attention_heads
    if m.num_experts and m.moe_ffn_hidden_size is None:
        m.moe_ffn_hidden_size = m.ffn_hidden_size
    if t.recompute_granularity == "full" and t.recompute_method is None:
        t.recompute_method = "uniform"
    if d.mock_data and m.vocab_size is None:
        m.vocab_size = 32000


def _err(msg: str):
    raise MegahetError(msg)


def validate_config(cfg: MegahetConfig, world_size: Optional[int] = None) -> None:
    """Cross-field checks; each failure is one line naming the flags and the fix."""
    m, p, t, d = cfg.model, cfg.parallel, cfg.train, cfg.data
    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    for name, v in [("tensor-model-parallel-size", tp), ("pipeline-model-parallel-size", pp),
                    ("expert-model-parallel-size", ep), ("num-layers", m.num_layers), ("hidden-size", m.hidden_size),
                    ("num-attention-heads", m.num_attention_heads), ("micro-batch-size", t.micro_batch_size),
                    ("global-batch-size", t.global_batch_size), ("seq-length", m.seq_length),
                    ("log-interval", cfg.logging.log_interval)]:
        if v < 1:
            _err(f"--{name} must be >= 1, got {v}")
    if m.hidden_size % m.num_attention_heads:
        _err(f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads {m.num_attention_heads}; "
             f"choose a head count that divides it")
    if m.num_attention_heads % tp:
        _err(f"--num-attention-heads {m.num_attention_heads} is not divisible by --tensor-model-parallel-size {tp}; "
             f"use a tensor-parallel size that divides the head count")
    if m.num_attention_heads % m.num_query_groups:
        _err(f"--num-query-groups {m.num_query_groups} does not divide --num-attention-heads {m.num_attention_heads}; "
             f"pick a divisor of the head count")
    if m.num_query_groups % tp:
        _err(f"--num-query-groups {m.num_query_groups} is not divisible by --tensor-model-parallel-size {tp}; "
             f"use more query groups or a smaller tensor-parallel size")
    if m.ffn_hidden_size % tp:
        _err(f"--ffn-hidden-size {m.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}")
    if m.position_embedding_type == "rope" and m.kv_channels % 2:
        _err(f"RoPE needs an even head dimension, got {m.kv_channels}; change --hidden-size or --num-attention-heads")
    if m.use_rope_scaling and (m.rope_scaling_factor <= 0 or
                               m.rope_scaling_high_freq_factor <= m.rope_scaling_low_freq_factor):
        _err("--use-rope-scaling needs --rope-scaling-factor > 0 and --rope-scaling-high-freq-factor > "
             "--rope-scaling-low-freq-factor")
    if m.max_position_embeddings < m.seq_length:
        _err(f"--seq-length {m.seq_length} exceeds --max-position-embeddings {m.max_position_embeddings}")
    if p.sequence_parallel and m.seq_length % tp:
        _err(f"--sequence-parallel needs --seq-length {m.seq_length} divisible by --tensor-model-parallel-size {tp}")
    if m.num_experts is not None:
        if m.num_experts < 1:
            _err(f"--num-experts must be >= 1, got {m.num_experts}")
        if m.num_experts % ep:
            _err(f"--num-experts {m.num_experts} is not divisible by --expert-model-parallel-size {ep}; "
                 f"use an expert-parallel size that divides the expert count")
        if m.moe_router_topk > m.num_experts:
            _err(f"--moe-router-topk {m.moe_router_topk} is larger than --num-experts {m.num_experts}; lower the top-k")
        if m.moe_router_num_groups:
            if m.num_experts % m.moe_router_num_groups:
                _err(f"--moe-router-num-groups {m.moe_router_num_groups} must divide --num-experts {m.num_experts}")
            if not m.moe_router_group_topk or m.moe_router_group_topk > m.moe_router_num_groups:
                _err("--moe-router-group-topk must be set and at most --moe-router-num-groups")
            per_group = m.num_experts // m.moe_router_num_groups
            if m.moe_router_topk // m.moe_router_group_topk > per_group or \
                    m.moe_router_topk > m.moe_router_group_topk * per_group:
                _err(f"--moe-router-topk {m.moe_router_topk} with --moe-router-group-topk {m.moe_router_group_topk} "
                     f"needs topk // group-topk <= {per_group} experts per group and topk <= group-topk x {per_group}; "
                     f"select more groups or fewer experts")
        if isinstance(m.moe_layer_freq, list) and len(m.moe_layer_freq) != m.num_layers:
            _err(f"--moe-layer-freq lists {len(m.moe_layer_freq)} layers but --num-layers is {m.num_layers}; "
                 f"give one 0/1 per layer")
        if isinstance(m.moe_layer_freq, int) and m.moe_layer_freq < 1:
            _err(f"--moe-layer-freq must be >= 1 or a 0/1 list, got {m.moe_layer_freq}")
        if m.moe_ffn_hidden_size % tp:
            _err(f"--moe-ffn-hidden-size {m.moe_ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}")
    elif ep > 1:
        _err(f"--expert-model-parallel-size {ep} needs an MoE model; set --num-experts")
    if t.bf16 and t.fp16:
        _err("--bf16 and --fp16 are exclusive; choose one")
    if t.train_iters is None and t.train_samples is None:
        _err("set --train-iters or --train-samples")
    if t.min_lr > t.lr:
        _err(f"--min-lr {t.min_lr} is larger than --lr {t.lr}")
    if p.pipeline_layers is not None:
        if len(p.pipeline_layers) not in (pp, pp * max(1, _vpp(cfg))):
            _err(f"--pipeline-layers has {len(p.pipeline_layers)} entries but --pipeline-model-parallel-size is {pp}; "
                 f"give one layer count per stage")
        if sum(p.pipeline_layers) != m.num_layers:
            _err(f"--pipeline-layers {','.join(map(str, p.pipeline_layers))} sums to {sum(p.pipeline_layers)}, "
                 f"not --num-layers {m.num_layers}; make them agree")
    split_paths = d.train_data_path or d.valid_data_path or d.test_data_path
    if split_paths and d.data_path:
        _err("--data-path and --train-data-path/--valid-data-path/--test-data-path are exclusive; give one or the other")
    if split_paths and not d.train_data_path and not d.mock_data:
        _err("--valid-data-path/--test-data-path need --train-data-path too")
    if d.tokenizer_model is not None and not os.path.exists(d.tokenizer_model):  # even where it is unused
        _err(f"--tokenizer-model {d.tokenizer_model} does not exist; pass an existing file or directory")
    if d.tokenizer_type == "HuggingFaceTokenizer" and not d.tokenizer_model and not d.mock_data:
        _err("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR_OR_TOKENIZER_JSON")
    if not d.mock_data and d.tokenizer_type == "NullTokenizer" and d.data_path is None and not split_paths:
        _err("--tokenizer-type NullTokenizer without --data-path needs --mock-data")
    if d.tokenizer_type == "NullTokenizer" and m.vocab_size is None:
        _err("--tokenizer-type NullTokenizer needs --vocab-size")
    if not cfg.hetero.straggler_threshold > 1:
        _err(f"--straggler-threshold {cfg.hetero.straggler_threshold} must be > 1 (a multiple of the median compute time)")
    if cfg.hetero.rebalance and _vpp(cfg) > 1:
        _err("--rebalance cannot change micro-batch counts under the interleaved schedule; drop "
             "--num-layers-per-virtual-pipeline-stage or --rebalance")
    if world_size is not None:
        validate_world(cfg, world_size)


def _vpp(cfg: MegahetConfig) -> int:
    p, m = cfg.parallel, cfg.model
    if not p.num_layers_per_virtual_pipeline_stage:
        return 1
    per_stage = m.num_layers // p.pipeline_model_parallel_size
    return max(1, per_stage // p.num_layers_per_virtual_pipeline_stage)


def validate_world(cfg: MegahetConfig, world_size: int) -> None:
    """Checks that need the number of ranks."""
    p, t = cfg.parallel, cfg.train
    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    if world_size % (tp * pp):
        _err(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
             f"--pipeline-model-parallel-size {pp}; change the degrees or the number of ranks")
    dp = world_size // (tp * pp)
    if dp % ep:
        _err(f"data-parallel size {dp} (= world {world_size} / tp {tp} / pp {pp}) is not divisible by "
             f"--expert-model-parallel-size {ep}; experts are sharded over data-parallel ranks")
    if t.global_batch_size % (t.micro_batch_size * dp):
        _err(f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size {t.micro_batch_size} "
             f"x data-parallel size {dp}; use a multiple of {t.micro_batch_size * dp}")


def config_from_dict(tree: dict, validate: bool = False) -> MegahetConfig:
    """Rebuild a config from `MegahetConfig.to_dict()` (as stored in checkpoints)."""
    flat = {}
    for section, fields in tree.items():
        if section not in SECTIONS:
            raise MegahetError(f"unknown config section '{section}'")
        flat.update(fields)
    return build_config(overrides=flat, validate=validate)
