"""Hugging Face interoperability: configs and weights of Llama, Qwen3, Mixtral and Qwen3-MoE models
to and from megahet checkpoints, streamed one tensor at a time (tools/convert_checkpoint.py)."""
from megahet.hf.convert import export_to_hf, import_from_hf

__all__ = ["export_to_hf", "import_from_hf"]
