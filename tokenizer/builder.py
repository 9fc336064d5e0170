"""Build the tokenizer a run asks for (--tokenizer-type) and pad its vocabulary for tensor parallelism."""
import logging

from megahet.errors import MegahetError
from megahet.tokenizer.base import AbstractTokenizer

logger = logging.getLogger(__name__)

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer")


def build_tokenizer(tokenizer_type: str, tokenizer_model: "str | None" = None,
                    vocab_size: "int | None" = None) -> AbstractTokenizer:
    """Return the tokenizer named by `tokenizer_type` (Megatron's --tokenizer-type names).

    SentencePieceTokenizer and HuggingFaceTokenizer need `tokenizer_model`; NullTokenizer needs `vocab_size`.
    """
    if tokenizer_type == "SentencePieceTokenizer":
        if not tokenizer_model:
            raise MegahetError("SentencePieceTokenizer needs a model; pass --tokenizer-model "
                               "or run tools/train_tokenizer.py")
        from megahet.tokenizer.sentencepiece_tokenizer import SentencePieceTokenizer
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer":
        if not tokenizer_model:
            raise MegahetError("HuggingFaceTokenizer needs its files; pass --tokenizer-model DIR_OR_TOKENIZER_JSON")
        from megahet.tokenizer.huggingface_tokenizer import HuggingFaceTokenizer
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise MegahetError("NullTokenizer needs a vocabulary size; pass --vocab-size")
        from megahet.tokenizer.null_tokenizer import NullTokenizer
        return NullTokenizer(vocab_size)
    raise MegahetError(f"unknown --tokenizer-type {tokenizer_type!r}; "
                       f"choose one of {', '.join(TOKENIZER_TYPES)}")


def padded_vocab_size(vocab_size: int, divisible_by: int = 128, tp_size: int = 1) -> int:
    """Round `vocab_size` up to a multiple of `divisible_by * tp_size` (Megatron's rule).

    Every tensor-parallel rank then holds an equal, aligned slice of the embedding and output layer.
    """
    if vocab_size < 1 or divisible_by < 1 or tp_size < 1:
        raise MegahetError(f"padded_vocab_size needs positive sizes, got vocab_size={vocab_size}, "
                           f"divisible_by={divisible_by}, tp_size={tp_size}; fix --make-vocab-size-divisible-by "
                           f"or --tensor-model-parallel-size")
    multiple = divisible_by * tp_size
    padded = -(-vocab_size // multiple) * multiple
    if padded != vocab_size:
        logger.debug("padded vocab %d to %d (multiple of %d)", vocab_size, padded, multiple)
    return padded
