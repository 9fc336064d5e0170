"""Tokenizers: training, round trips, special ids, builders, vocabulary padding."""
import importlib.util
import json
import os

import pytest

from megahet.errors import MegahetError
from megahet.tokenizer import (BOS_ID, EOS_ID, PAD_ID, UNK_ID, NullTokenizer, SentencePieceTokenizer,
                               build_tokenizer, padded_vocab_size, train_sentencepiece)

TEXTS = [f"Document {i}: the quick brown fox jumps over the lazy dog, {i * 37} times.\n"
         f"    Indented line with  two spaces; tabs\there." for i in range(200)]
VOCAB = 400


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return train_sentencepiece(iter(TEXTS), str(tmp_path_factory.mktemp("tok") / "tok"), VOCAB)


def test_round_trip_and_special_ids(model_path):
    tokenizer = SentencePieceTokenizer(model_path)
    assert tokenizer.vocab_size == VOCAB
    assert (UNK_ID, BOS_ID, EOS_ID, PAD_ID) == (0, 1, 2, 3)
    assert (tokenizer.bos, tokenizer.eos, tokenizer.pad, tokenizer.eod) == (BOS_ID, EOS_ID, PAD_ID, EOS_ID)
    for text in [TEXTS[5], "  leading spaces\n\nand blank lines", "unseen: émigré 日本語 🙂 ~{}", ""]:
        ids = tokenizer.tokenize(text)
        assert all(isinstance(i, int) and 0 <= i < VOCAB for i in ids)
        assert UNK_ID not in ids  # byte fallback covers every character
        assert tokenizer.detokenize(ids) == text
    assert len(tokenizer.tokenize(TEXTS[0])) < len(TEXTS[0]) / 2  # BPE merges really happened


def test_training_is_deterministic_and_reads_jsonl(model_path, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text, "id": i}) + "\n" for i, text in enumerate(TEXTS)))
    again = train_sentencepiece(str(corpus), str(tmp_path / "again"), VOCAB)
    with open(model_path, "rb") as first, open(again, "rb") as second:
        assert first.read() == second.read()
    assert os.path.isfile(str(tmp_path / "again.vocab"))
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no temp leftovers


def test_missing_model_names_the_fix(tmp_path):
    missing = str(tmp_path / "nope.model")
    with pytest.raises(MegahetError, match="tokenizer model .*nope.model not found; pass --tokenizer-model "
                                           "or run tools/train_tokenizer.py"):
        SentencePieceTokenizer(missing)
    with pytest.raises(MegahetError, match="--tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer", None)


def test_bad_training_requests(tmp_path):
    with pytest.raises(MegahetError, match="too small"):
        train_sentencepiece(iter(TEXTS), str(tmp_path / "t"), 100)
    with pytest.raises(MegahetError, match="no text"):
        train_sentencepiece(iter(["", "  "]), str(tmp_path / "t"), VOCAB)
    with pytest.raises(MegahetError, match="not found"):
        train_sentencepiece([str(tmp_path / "missing.txt")], str(tmp_path / "t"), VOCAB)


def test_null_tokenizer():
    tokenizer = build_tokenizer("NullTokenizer", vocab_size=100)
    assert isinstance(tokenizer, NullTokenizer)
    assert tokenizer.tokenize(" 5 17\n3 ") == [5, 17, 3]
    assert tokenizer.detokenize([5, 17, 3]) == "5 17 3"
    assert tokenizer.vocab_size == 100 and tokenizer.eod == tokenizer.eos == 99
    with pytest.raises(MegahetError, match="outside"):
        tokenizer.tokenize("1 100")
    with pytest.raises(MegahetError, match="integers"):
        tokenizer.tokenize("hello")
    with pytest.raises(MegahetError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")


def test_unknown_tokenizer_type():
    with pytest.raises(MegahetError, match="unknown --tokenizer-type 'GPT2BPETokenizer'; choose one of"):
        build_tokenizer("GPT2BPETokenizer")


def test_padded_vocab_size():
    assert padded_vocab_size(50257, 128, 1) == 50304
    assert padded_vocab_size(50257, 128, 8) == 51200
    assert padded_vocab_size(256, 128, 2) == 256
    assert padded_vocab_size(8000, 128, 3) == 8064
    with pytest.raises(MegahetError):
        padded_vocab_size(100, 0, 1)


def test_train_tokenizer_cli(tmp_path, capsys):
    corpus = tmp_path / "lines.txt"
    corpus.write_text("\n".join(TEXTS))
    spec = importlib.util.spec_from_file_location(
        "train_tokenizer", os.path.join(os.path.dirname(__file__), "..", "..", "tools", "train_tokenizer.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--input", str(corpus), "--model-prefix", str(tmp_path / "cli"), "--vocab-size", "400"]) == 0
    assert SentencePieceTokenizer(str(tmp_path / "cli.model")).vocab_size == 400
    assert tool.main(["--input", str(tmp_path / "x.txt"), "--model-prefix", str(tmp_path / "c"),
                      "--vocab-size", "400"]) == 2
    assert "not found" in capsys.readouterr().err
