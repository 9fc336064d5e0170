#!/usr/bin/env python
"""Convert checkpoints between Hugging Face model folders and megahet, one tensor at a time.

    python tools/convert_checkpoint.py --from hf --load HF_DIR --output CKPT_DIR
    python tools/convert_checkpoint.py --to hf --load CKPT_DIR --output HF_DIR [--max-shard-size 5GB]

Llama-style dense models (GQA, tied or untied embeddings, Llama 3 RoPE scaling), Qwen3 (per-head q/k
norms), Mixtral and Qwen3-MoE. An imported model trains with `--load CKPT_DIR` (or `--finetune`) and the
architecture flags this tool prints; any saved layout or plan exports.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megahet.errors import MegahetError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="source", choices=["hf"], help="import a Hugging Face folder")
    direction.add_argument("--to", dest="target", choices=["hf"], help="export to a Hugging Face folder")
    parser.add_argument("--load", required=True, help="the folder or checkpoint to convert")
    parser.add_argument("--output", required=True, help="where the converted model goes")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard when exporting")
    parser.add_argument("--architecture", default=None,
                        choices=["LlamaForCausalLM", "Qwen3ForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM"],
                        help="export as this architecture (default: the first that expresses the model)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        from megahet.hf import export_to_hf, import_from_hf
        from megahet.hf.safetensors_io import parse_size

        if args.source == "hf":
            print(import_from_hf(args.load, args.output))
        else:
            print(export_to_hf(args.load, args.output, parse_size(args.max_shard_size), args.architecture))
    except MegahetError as error:
        print(f"megahet error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
