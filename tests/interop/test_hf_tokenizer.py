"""--tokenizer-type HuggingFaceTokenizer: a tiny tokenizer trained here, loaded from disk with
transformers or with tokenizers alone, in preprocessing and the dataset builder."""
import json
import sys

import pytest

from megahet.data.builder import build_datasets
from megahet.data.indexed_dataset import IndexedDataset
from megahet.data.preprocess import preprocess_data
from megahet.errors import MegahetError
from megahet.tokenizer import build_tokenizer

pytest.importorskip("tokenizers", reason="tokenizers not installed; pip install tokenizers")
TEXTS = [f"Document {i}: the quick brown fox jumps over {i % 7} lazy dogs. Ünïcode ok." for i in range(120)]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megahet.tokenizer.train import train_huggingface_bpe
    root = tmp_path_factory.mktemp("hf-tok")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return str(corpus), train_huggingface_bpe(str(corpus), str(root / "tok"), 400)


@pytest.mark.parametrize("library", ["transformers", "tokenizers"])
def test_round_trip_and_special_ids(hf_dir, monkeypatch, library):
    if library == "transformers":
        pytest.importorskip("transformers", reason="transformers not installed; pip install transformers")
    else:
        monkeypatch.setitem(sys.modules, "transformers", None)  # import fails: tokenizers alone
    for path in (hf_dir[1], hf_dir[1] + "/tokenizer.json"):
        tok = build_tokenizer("HuggingFaceTokenizer", path)
        assert tok.vocab_size == 400 and tok.eod == tok.eos == 0 and tok.pad == 1
        ids = tok.tokenize(TEXTS[3])
        assert 0 not in ids and tok.detokenize(ids) == TEXTS[3]


def test_preprocess_and_build_with_hf_tokenizer(hf_dir, tmp_path):
    corpus, tok_dir = hf_dir
    prefix = preprocess_data(corpus, str(tmp_path / "d"), "HuggingFaceTokenizer", tok_dir, append_eod=True)
    tok = build_tokenizer("HuggingFaceTokenizer", tok_dir)
    data = IndexedDataset(prefix)
    assert data.vocab_size == 400 and data[5][-1] == tok.eod
    assert tok.detokenize(data[5][:-1]) == TEXTS[5]
    train, valid, _ = build_datasets([prefix], "90,10,0", 16, 1, (40, 8, 0), tok, cache_dir=str(tmp_path / "c"))
    assert len(train) >= 40 and len(valid) >= 8 and train.pad_id == 1


def test_missing_tokenizer_is_a_one_line_error(tmp_path):
    with pytest.raises(MegahetError, match="not found; pass a Hugging Face tokenizer directory"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "nothing"))
    from megahet.config import build_config
    with pytest.raises(MegahetError, match="--tokenizer-model .*nothing does not exist"):
        build_config({"train_iters": 1, "mock_data": True, "tokenizer_model": str(tmp_path / "nothing")})
