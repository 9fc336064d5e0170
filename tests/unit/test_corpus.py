"""Built-in corpus: built once from the standard library's own text, cached, safe to build concurrently."""
import json
import multiprocessing
import os
import sys
import sysconfig

import pytest

from megahet.data.corpus import default_cache_dir, ensure_builtin_corpus, iter_corpus, module_document
from megahet.data.gpt_dataset import GPTDataset
from megahet.data.indexed_dataset import IndexedDataset
from megahet.tokenizer import SentencePieceTokenizer

DOCS, VOCAB = 12, 600


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two processes build the same cache at once: the lock must make them agree."""
    cache = str(tmp_path_factory.mktemp("cache"))
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(ensure_builtin_corpus, [(cache, VOCAB, DOCS)] * 2)
    assert results[0] == results[1]
    return results[0]


def test_tokenizer_and_dataset_load(built):
    tokenizer = SentencePieceTokenizer(built.tokenizer_model)
    dataset = IndexedDataset(built.data_prefix)
    assert tokenizer.vocab_size == VOCAB and len(dataset) == DOCS
    dataset.check_vocab(tokenizer.vocab_size)
    with open(built.corpus_path, encoding="utf-8") as handle:
        documents = [json.loads(line) for line in handle]
    assert len(documents) == DOCS and all(doc["source"].startswith("pydoc:") for doc in documents)
    assert tokenizer.detokenize(dataset[0][:-1]) == documents[0]["text"]  # each document ends with eod
    assert dataset[0][-1] == tokenizer.eod
    samples = GPTDataset(dataset, (0, len(dataset)), 64, 1, 10, cache_dir=os.path.dirname(built.data_prefix))
    assert len(samples) >= 10 and samples[3]["tokens"].shape == (64,)


def test_second_call_reuses_the_cache(built):
    before = {path: os.stat(path).st_mtime_ns for path in (built.tokenizer_model, built.data_prefix + ".bin")}
    again = ensure_builtin_corpus(os.path.dirname(os.path.dirname(built.corpus_path)), VOCAB, DOCS)
    assert again == built
    assert {path: os.stat(path).st_mtime_ns for path in before} == before


def test_corpus_is_deterministic_real_text():
    first, second = list(iter_corpus(max_docs=90)), list(iter_corpus(max_docs=90))
    assert first == second and len(first) == 90
    assert first[0]["source"].startswith("pydoc:") and first[-1]["source"].startswith("stdlib:")
    assert sum(len(doc["text"]) for doc in first[:80]) > 100_000  # the topics alone are real prose


def test_module_docstrings_are_read_without_importing():
    path = os.path.join(sysconfig.get_paths()["stdlib"], "turtle.py")
    if not os.path.isfile(path):
        pytest.skip("this Python has no turtle.py source")
    assert "turtle" not in sys.modules
    text = module_document("turtle", path)
    assert "turtle" not in sys.modules
    assert text.startswith("turtle\n\n") and "turtle.TurtleScreen" in text


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MEGAHET_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == str(tmp_path)
    monkeypatch.delenv("MEGAHET_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "megahet")
