#!/usr/bin/env python
"""Train a tokenizer for megahet: sentencepiece (byte-fallback BPE, fixed special ids) or a Hugging Face
byte-level BPE (tokenizer.json).

Examples:
    python tools/train_tokenizer.py --input data/corpus.jsonl --model-prefix data/tok --vocab-size 32000
    python tools/train_tokenizer.py --tokenizer-type HuggingFaceTokenizer --input data/corpus.jsonl \
        --model-prefix data/hf_tok --vocab-size 32000     # writes the directory data/hf_tok/
"""
import argparse
import logging
import sys

from megahet.errors import MegahetError
from megahet.tokenizer import train_sentencepiece
from megahet.tokenizer.train import train_huggingface_bpe


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True,
                        help="text files (.txt: lines; .jsonl/.json: the --json-keys fields of each record)")
    parser.add_argument("--tokenizer-type", default="SentencePieceTokenizer",
                        choices=["SentencePieceTokenizer", "HuggingFaceTokenizer"])
    parser.add_argument("--model-prefix", required=True,
                        help="writes PREFIX.model and PREFIX.vocab (sentencepiece) or the directory PREFIX/ "
                             "(Hugging Face)")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--input-sentence-size", type=int, default=1_000_000,
                        help="sample at most this many lines (keeps large inputs fast)")
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        if args.tokenizer_type == "HuggingFaceTokenizer":
            print(train_huggingface_bpe(args.input, args.model_prefix, args.vocab_size, json_keys=args.json_keys))
            return 0
        path = train_sentencepiece(args.input, args.model_prefix, args.vocab_size, json_keys=args.json_keys,
                                   input_sentence_size=args.input_sentence_size,
                                   character_coverage=args.character_coverage, num_threads=args.num_threads,
                                   seed=args.seed)
    except MegahetError as error:
        print(f"megahet error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
