"""Tokenizers (installed as megahet.tokenizer): sentencepiece or Hugging Face for text, a null tokenizer for mock data."""
from megahet.tokenizer.base import AbstractTokenizer
from megahet.tokenizer.builder import TOKENIZER_TYPES, build_tokenizer, padded_vocab_size
from megahet.tokenizer.null_tokenizer import NullTokenizer
from megahet.tokenizer.sentencepiece_tokenizer import SentencePieceTokenizer
from megahet.tokenizer.train import BOS_ID, EOS_ID, PAD_ID, UNK_ID, train_sentencepiece

__all__ = ["AbstractTokenizer", "SentencePieceTokenizer", "NullTokenizer", "train_sentencepiece",
           "build_tokenizer", "padded_vocab_size", "TOKENIZER_TYPES", "UNK_ID", "BOS_ID", "EOS_ID",
           "PAD_ID"]
