#!/usr/bin/env python
"""Tokenize a JSONL or text corpus into an indexed dataset (PREFIX.bin / PREFIX.idx, Megatron's format).

Resumable: an interrupted run continues from its last finished chunk when started again with the same
arguments. Example:
    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/tok.model --append-eod --workers 4
"""
import argparse
import logging
import sys

from megahet.data.indexed_dataset import upgrade_legacy_index
from megahet.data.preprocess import preprocess_data
from megahet.errors import MegahetError
from megahet.tokenizer import TOKENIZER_TYPES


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upgrade-index", nargs="+", metavar="PREFIX", default=None,
                        help="rewrite datasets in megahet's old index format as Megatron's, in place, and exit")
    parser.add_argument("--input",
                        help=".jsonl (one JSON object per line) or .txt (documents separated by blank lines)")
    parser.add_argument("--json-keys", nargs="+", default=["text"],
                        help="JSON fields holding the text (several are joined by newlines)")
    parser.add_argument("--output-prefix")
    parser.add_argument("--tokenizer-type", default="SentencePieceTokenizer", choices=TOKENIZER_TYPES)
    parser.add_argument("--tokenizer-model", default=None)
    parser.add_argument("--vocab-size", type=int, default=None, help="for NullTokenizer")
    parser.add_argument("--append-eod", action="store_true", help="end every document with the eod id")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--chunk-docs", type=int, default=100_000,
                        help="documents per resumable chunk")
    parser.add_argument("--log-interval", type=int, default=1000, help="documents between progress updates")
    return parser.parse_args(argv)


def _progress_line(documents: int, tokens: int, seconds: float) -> None:
    seconds = max(seconds, 1e-9)
    sys.stderr.write(f"\r{documents} docs  {tokens} tokens  {documents / seconds:.0f} docs/s  "
                     f"{tokens / seconds:.0f} tokens/s  ")
    sys.stderr.flush()


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        if args.upgrade_index:
            for prefix in args.upgrade_index:
                upgrade_legacy_index(prefix)
                print(f"{prefix}.idx is in Megatron's format")
            return 0
        if not args.input or not args.output_prefix:
            raise MegahetError("pass --input FILE and --output-prefix PREFIX (or --upgrade-index PREFIX)")
        prefix = preprocess_data(args.input, args.output_prefix, args.tokenizer_type, args.tokenizer_model,
                                 args.vocab_size, json_keys=args.json_keys, append_eod=args.append_eod,
                                 workers=args.workers, chunk_docs=args.chunk_docs,
                                 log_interval=args.log_interval, progress=_progress_line)
    except MegahetError as error:
        print(f"\nmegahet error: {error}", file=sys.stderr)
        return 2
    sys.stderr.write("\n")
    print(f"wrote {prefix}.bin and {prefix}.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
