"""Checkpoint conversion between Hugging Face folders and megahet checkpoints, one tensor at a time.

Weight layouts (HF Linear weights are [out, in]):
    q/k/v_proj          -> linear_qkv [(nq + 2 nkv) d, h], per query group g: [q heads of g; k_g; v_g]
    gate/up_proj        -> linear_fc1 [2 ffn, h] = [gate; up]
    experts.j.w1/w3/w2  -> experts.linear_fc1 [E, h, 2 ffn] (row j = [gate_j; up_j]^T),
    (Qwen3: gate/up/down_proj)  experts.linear_fc2 [E, ffn, h] (row j = down_j^T)
Only one megahet tensor (at most one layer's experts) is in memory at a time, so a model larger than
memory converts; megahet checkpoints store global tensors, so any layout or plan that saved one converts.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Iterator, Tuple

import torch

from megahet.errors import MegahetError
from megahet.hf.config_map import choose_architecture, hf_to_model_fields, model_to_hf_config, moe_pattern
from megahet.hf.safetensors_io import HFWeights, write_sharded

log = logging.getLogger("megahet")


def _hf_layer_names(arch: str, i: int) -> dict:
    p = f"model.layers.{i}"
    moe = "block_sparse_moe" if arch == "MixtralForCausalLM" else "mlp"
    expert = ("w1", "w3", "w2") if arch == "MixtralForCausalLM" else ("gate_proj", "up_proj", "down_proj")
    return dict(input_norm=f"{p}.input_layernorm.weight", post_norm=f"{p}.post_attention_layernorm.weight",
                q=f"{p}.self_attn.q_proj.weight", k=f"{p}.self_attn.k_proj.weight", v=f"{p}.self_attn.v_proj.weight",
                o=f"{p}.self_attn.o_proj.weight", q_norm=f"{p}.self_attn.q_norm.weight",
                k_norm=f"{p}.self_attn.k_norm.weight", gate=f"{p}.mlp.gate_proj.weight", up=f"{p}.mlp.up_proj.weight",
                down=f"{p}.mlp.down_proj.weight", router=f"{p}.{moe}.gate.weight",
                expert=lambda j, which: f"{p}.{moe}.experts.{j}.{expert[which]}.weight")


def _mh_layer(i: int) -> str:
    return f"decoder.layers.{i}"


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """HF q [nq d, h], k/v [nkv d, h] -> megahet's per-group fused [(nq + 2 nkv) d, h]."""
    h = q.shape[1]
    q = q.reshape(groups, -1, h)  # [g, q_per_group d, h]
    return torch.cat([q, k.reshape(groups, -1, h), v.reshape(groups, -1, h)], dim=1).reshape(-1, h)


def split_qkv(qkv: torch.Tensor, groups: int, q_per_group: int, head_dim: int):
    """Inverse of fuse_qkv: [(nq + 2 nkv) d, h] -> q [nq d, h], k [nkv d, h], v [nkv d, h]."""
    h = qkv.shape[1]
    grouped = qkv.reshape(groups, (q_per_group + 2) * head_dim, h)
    q, k, v = grouped.split([q_per_group * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def _from_hf_tensors(hf: HFWeights, arch: str, fields: dict) -> Iterator[Tuple[str, torch.Tensor]]:
    """megahet (name, tensor) pairs read from the HF folder, one at a time."""
    groups = fields["num_query_groups"]
    pattern = fields.get("moe_layer_freq", 1)
    yield "embedding.word_embeddings.weight", hf.get("model.embed_tokens.weight")
    for i in range(fields["num_layers"]):
        n, m = _hf_layer_names(arch, i), _mh_layer(i)
        yield f"{m}.input_layernorm.weight", hf.get(n["input_norm"])
        yield f"{m}.self_attention.linear_qkv.weight", fuse_qkv(hf.get(n["q"]), hf.get(n["k"]), hf.get(n["v"]), groups)
        yield f"{m}.self_attention.linear_proj.weight", hf.get(n["o"])
        if fields["qk_layernorm"]:
            yield f"{m}.self_attention.q_layernorm.weight", hf.get(n["q_norm"])
            yield f"{m}.self_attention.k_layernorm.weight", hf.get(n["k_norm"])
        yield f"{m}.pre_mlp_layernorm.weight", hf.get(n["post_norm"])
        is_moe = fields.get("num_experts") and (pattern == 1 or pattern[i])
        if not is_moe:
            yield f"{m}.mlp.linear_fc1.weight", torch.cat([hf.get(n["gate"]), hf.get(n["up"])], dim=0)
            yield f"{m}.mlp.linear_fc2.weight", hf.get(n["down"])
            continue
        experts = range(fields["num_experts"])
        yield f"{m}.mlp.router.weight", hf.get(n["router"]).float()
        yield f"{m}.mlp.experts.linear_fc1.weight", torch.stack(
            [torch.cat([hf.get(n["expert"](j, 0)), hf.get(n["expert"](j, 1))], dim=0).t() for j in experts])
        yield f"{m}.mlp.experts.linear_fc2.weight", torch.stack([hf.get(n["expert"](j, 2)).t() for j in experts])
    yield "decoder.final_layernorm.weight", hf.get("model.norm.weight")
    if fields["untie_embeddings_and_output_weights"]:
        yield "output_layer.weight", hf.get("lm_head.weight")


def megahet_flags(fields: dict) -> str:
    """The training flags that rebuild this architecture (printed for --finetune / --load runs)."""
    out = []
    for name, value in fields.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            out.append(f"{flag} '{json.dumps(value).replace(' ', '')}'")
        else:
            out.append(f"{flag} {value}")
    return " ".join(out)


def import_from_hf(hf_dir: str, output: str, iteration: int = 0) -> str:
    """Convert the Hugging Face model folder `hf_dir` to a megahet model checkpoint under `output`.

    Returns the checkpoint directory; `--load output` or `--finetune --load output` and `load_model(output)`
    accept it (with the architecture flags `megahet_flags` prints).
    """
    from megahet.config import build_config
    from megahet.training.checkpoint_format import write_model_checkpoint

    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_path):
        raise MegahetError(f"{hf_dir} has no config.json; pass a Hugging Face model folder to --load")
    with open(config_path) as handle:
        hf_config = json.load(handle)
    fields = hf_to_model_fields(hf_config)
    arch = hf_config["architectures"][0]
    cfg = build_config(dict(fields, train_iters=1), validate=False)
    weights = HFWeights(hf_dir)
    try:
        path = write_model_checkpoint(output, _from_hf_tensors(weights, arch, fields),
                                      {"config": cfg.to_dict(), "vocab_size": fields["vocab_size"],
                                       "iteration": iteration, "source": f"huggingface:{arch}"})
    finally:
        weights.close()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        if os.path.isfile(os.path.join(hf_dir, name)):  # --tokenizer-model output/tokenizer
            os.makedirs(os.path.join(output, "tokenizer"), exist_ok=True)
            shutil.copy(os.path.join(hf_dir, name), os.path.join(output, "tokenizer", name))
    log.info("imported %s (%s) into %s; train it with: %s", hf_dir, arch, path, megahet_flags(fields))
    return path


def _to_hf_tensors(reader, m, arch: str) -> Iterator[Tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs from a megahet checkpoint, reading one megahet tensor at a time."""
    def read(name):
        return reader.read(f"model/{name}")

    q_per_group = m.num_attention_heads // m.num_query_groups
    pattern = moe_pattern(m)
    yield "model.embed_tokens.weight", read("embedding.word_embeddings.weight")
    for i in range(m.num_layers):
        n, p = _hf_layer_names(arch, i), _mh_layer(i)
        yield n["input_norm"], read(f"{p}.input_layernorm.weight")
        q, k, v = split_qkv(read(f"{p}.self_attention.linear_qkv.weight"), m.num_query_groups, q_per_group,
                            m.kv_channels)
        yield n["q"], q
        yield n["k"], k
        yield n["v"], v
        yield n["o"], read(f"{p}.self_attention.linear_proj.weight")
        if m.qk_layernorm:
            yield n["q_norm"], read(f"{p}.self_attention.q_layernorm.weight")
            yield n["k_norm"], read(f"{p}.self_attention.k_layernorm.weight")
        yield n["post_norm"], read(f"{p}.pre_mlp_layernorm.weight")
        if not pattern[i]:
            gate, up = read(f"{p}.mlp.linear_fc1.weight").chunk(2, dim=0)
            yield n["gate"], gate.contiguous()
            yield n["up"], up.contiguous()
            yield n["down"], read(f"{p}.mlp.linear_fc2.weight")
            continue
        yield n["router"], read(f"{p}.mlp.router.weight")
        fc1 = read(f"{p}.mlp.experts.linear_fc1.weight")  # [E, h, 2 ffn]
        for j in range(m.num_experts):
            gate, up = fc1[j].t().chunk(2, dim=0)
            yield n["expert"](j, 0), gate.contiguous()
            yield n["expert"](j, 1), up.contiguous()
        del fc1
        fc2 = read(f"{p}.mlp.experts.linear_fc2.weight")  # [E, ffn, h]
        for j in range(m.num_experts):
            yield n["expert"](j, 2), fc2[j].t().contiguous()
        del fc2
    yield "model.norm.weight", read("decoder.final_layernorm.weight")
    if m.untie_embeddings_and_output_weights:
        yield "lm_head.weight", read("output_layer.weight")


def export_to_hf(load: str, hf_dir: str, max_shard_bytes: int = 5 << 30, architecture: "str | None" = None) -> str:
    """Write the megahet checkpoint under `load` (any layout) as a Hugging Face folder `hf_dir`.

    The architecture is the first of Llama/Qwen3 (dense) or Mixtral/Qwen3-MoE (MoE) that expresses the
    model, or `architecture`; features none can express are a one-line error naming them.
    """
    from megahet.config import config_from_dict
    from megahet.training.checkpoint_format import CheckpointReader

    reader = CheckpointReader(load)
    m = config_from_dict(reader.meta["config"]).model
    vocab = int(reader.meta["vocab_size"])
    arch = architecture or choose_architecture(m)
    hf_config = model_to_hf_config(m, vocab, arch)
    if os.path.exists(hf_dir) and os.listdir(hf_dir):
        raise MegahetError(f"--output {hf_dir} exists and is not empty; pass a new directory")
    partial = hf_dir.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        write_sharded(partial, _to_hf_tensors(reader, m, arch), max_shard_bytes)
    finally:
        reader.close()
    with open(os.path.join(partial, "config.json"), "w") as handle:
        json.dump(hf_config, handle, indent=2)
    tokenizer_dir = os.path.join(os.path.dirname(reader.path), "tokenizer")
    if os.path.isdir(tokenizer_dir):  # imported from HF: hand the tokenizer back
        for name in os.listdir(tokenizer_dir):
            shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(partial, name))
    if os.path.isdir(hf_dir):
        os.rmdir(hf_dir)
    os.replace(partial, hf_dir)  # the folder appears complete or not at all
    log.info("exported %s as %s to %s", reader.path, arch, hf_dir)
    return hf_dir
