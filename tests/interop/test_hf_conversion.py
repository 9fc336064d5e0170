"""Hugging Face <-> megahet conversion: logits equal (fp32, max |diff| <= 1e-5) on random tiny Llama,
Qwen3, Mixtral and Qwen3-MoE models in both directions, sharded folders, one-line errors for features an
architecture cannot express."""
import json
import os

import pytest
import torch

from megahet.errors import MegahetError

transformers = pytest.importorskip("transformers", reason="transformers not installed; pip install transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
MODELS = {
    "llama-gqa-untied-rope-scaling": ("LlamaForCausalLM", "LlamaConfig", dict(
        tie_word_embeddings=False, rope_theta=50000.0,
        rope_scaling=dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16))),
    "llama-tied": ("LlamaForCausalLM", "LlamaConfig", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=24, tie_word_embeddings=False)),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3-moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[1],
        norm_topk_prob=False, head_dim=16)),
}


def make_hf(name, directory, max_shard_size="100MB"):
    arch, config_cls, extra = MODELS[name]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if "norm" in pname else 0.02))
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_logits_match(tmp_path, name):
    from megahet.hf import export_to_hf, import_from_hf
    from megahet.inference import load_model

    original = make_hf(name, tmp_path / "hf", max_shard_size="60KB" if name == "mixtral" else "100MB")
    if name == "mixtral":
        assert os.path.isfile(tmp_path / "hf" / "model.safetensors.index.json")  # sharded input
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    expected = hf_logits(original, tokens)

    import_from_hf(str(tmp_path / "hf"), str(tmp_path / "mh"))
    ours = load_model(str(tmp_path / "mh"))(tokens)
    assert (ours - expected).abs().max().item() <= 1e-5

    export_to_hf(str(tmp_path / "mh"), str(tmp_path / "back"), max_shard_bytes=50_000)
    assert os.path.isfile(tmp_path / "back" / "model.safetensors.index.json")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == [MODELS[name][0]]
    back = getattr(transformers, MODELS[name][0]).from_pretrained(str(tmp_path / "back")).float().eval()
    assert (hf_logits(back, tokens) - expected).abs().max().item() <= 1e-5
    original_state = original.state_dict()
    for key, value in back.state_dict().items():
        assert torch.equal(value, original_state[key]), key


def test_inexpressible_features_are_one_line_errors(tmp_path):
    from megahet.config import build_config
    from megahet.hf import export_to_hf
    from megahet.training.checkpoint_format import write_model_checkpoint

    def save(**model):
        cfg = build_config(dict(train_iters=1, mock_data=True, num_layers=1, hidden_size=32, num_attention_heads=2,
                                **model), validate=False)
        path = str(tmp_path / f"ck{len(os.listdir(tmp_path))}")
        write_model_checkpoint(path, [], {"config": cfg.to_dict(), "vocab_size": 10})
        return path

    with pytest.raises(MegahetError, match="a shared expert and a sigmoid router cannot be exported to "
                                           "MixtralForCausalLM"):
        export_to_hf(save(num_experts=4, moe_shared_expert_intermediate_size=16, moe_router_score_function="sigmoid"),
                     str(tmp_path / "x"))
    with pytest.raises(MegahetError, match="LayerNorm cannot be exported to LlamaForCausalLM"):
        export_to_hf(save(normalization="LayerNorm"), str(tmp_path / "y"))
    with pytest.raises(MegahetError, match="per-head query/key norms cannot be exported to MixtralForCausalLM"):
        from megahet.hf.config_map import model_to_hf_config
        cfg = build_config(dict(train_iters=1, mock_data=True, num_experts=4, qk_layernorm=True)).model
        model_to_hf_config(cfg, 10, "MixtralForCausalLM")
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "x.partial")


def test_cli_and_unsupported_input(tmp_path):
    import subprocess
    import sys
    tool = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "convert_checkpoint.py")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    done = subprocess.run([sys.executable, tool, "--from", "hf", "--load", str(tmp_path / "bad"), "--output",
                           str(tmp_path / "o")], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("megahet error: architecture GPT2LMHeadModel is not supported")
