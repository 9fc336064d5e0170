"""Preprocessing: input formats, resumable chunks (same bytes as a straight run), workers, errors."""
import importlib.util
import json
import os

import pytest

from megahet.data.indexed_dataset import IndexedDataset
from megahet.data.preprocess import preprocess_data, read_documents
from megahet.errors import MegahetError
from megahet.tokenizer import build_tokenizer, train_sentencepiece

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar".split()
TEXTS = [f"Record {i}: {' '.join(WORDS[(i * k) % len(WORDS)] + WORDS[k % 5] for k in range(12))}.\n"
         f"Second line, {i * 13} units." for i in range(300)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    path = root / "in.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    model = train_sentencepiece(str(path), str(root / "tok"), 400)
    return str(path), model


def read_bytes(prefix):
    with open(prefix + ".bin", "rb") as data, open(prefix + ".idx", "rb") as index:
        return data.read(), index.read()


def run(corpus, prefix, **kwargs):
    path, model = corpus
    return preprocess_data(path, str(prefix), "SentencePieceTokenizer", model, append_eod=True, **kwargs)


def test_documents_round_trip(corpus, tmp_path):
    prefix = run(corpus, tmp_path / "out")
    dataset, tokenizer = IndexedDataset(prefix), build_tokenizer("SentencePieceTokenizer", corpus[1])
    assert len(dataset) == len(TEXTS)
    dataset.check_vocab(tokenizer.vocab_size)
    for i in (0, 17, 299):
        assert dataset[i][-1] == tokenizer.eod
        assert tokenizer.detokenize(dataset[i][:-1]) == TEXTS[i]
    assert sorted(os.listdir(tmp_path)) == ["out.bin", "out.idx", "out.meta.json"]


def test_interrupted_run_resumes_to_identical_bytes(corpus, tmp_path):
    straight = read_bytes(run(corpus, tmp_path / "straight", chunk_docs=64))
    assert run(corpus, tmp_path / "resumed", chunk_docs=64, max_chunks=1) is None  # "killed" after chunk 0
    with open(tmp_path / "resumed.progress.json") as handle:
        assert json.load(handle)["done_chunks"] == 1
    assert os.path.isfile(tmp_path / "resumed_part0.idx") and not os.path.exists(tmp_path / "resumed.bin")
    finished_part = os.stat(tmp_path / "resumed_part0.bin").st_mtime_ns
    assert run(corpus, tmp_path / "resumed", chunk_docs=64, max_chunks=2) is None
    assert os.stat(tmp_path / "resumed_part0.bin").st_mtime_ns == finished_part  # not re-encoded
    run(corpus, tmp_path / "resumed", chunk_docs=64)
    assert read_bytes(str(tmp_path / "resumed")) == straight
    assert sorted(os.listdir(tmp_path)) == ["resumed.bin", "resumed.idx", "resumed.meta.json", "straight.bin",
                                            "straight.idx", "straight.meta.json"]


def test_changed_settings_start_over(corpus, tmp_path):
    run(corpus, tmp_path / "o", chunk_docs=64, max_chunks=3)
    path, model = corpus
    preprocess_data(path, str(tmp_path / "o"), "SentencePieceTokenizer", model, append_eod=False, chunk_docs=200)
    assert IndexedDataset(str(tmp_path / "o"))[0][-1] != 2  # no chunk of the eod run survived
    assert sorted(os.listdir(tmp_path)) == ["o.bin", "o.idx", "o.meta.json"]  # nor any stale part


def test_workers_give_the_same_output(corpus, tmp_path):
    single = read_bytes(run(corpus, tmp_path / "one", chunk_docs=100))
    assert read_bytes(run(corpus, tmp_path / "two", chunk_docs=100, workers=2)) == single


def test_text_paragraphs(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("1 2 3\n4\n\n\n5 6\n   \n7\n")
    assert list(read_documents(str(path))) == ["1 2 3\n4", "5 6", "7"]
    prefix = preprocess_data(str(path), str(tmp_path / "t"), "NullTokenizer", vocab_size=10, append_eod=True)
    dataset = IndexedDataset(prefix)
    assert [dataset[i].tolist() for i in range(len(dataset))] == [[1, 2, 3, 4, 9], [5, 6, 9], [7, 9]]


def test_bad_inputs(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "1 2"}\nnot json\n')
    with pytest.raises(MegahetError, match=r"bad\.jsonl:2 is not valid JSON"):
        preprocess_data(str(bad), str(tmp_path / "b"), "NullTokenizer", vocab_size=10)
    keyless = tmp_path / "keyless.jsonl"
    keyless.write_text('{"content": "1 2"}\n')
    with pytest.raises(MegahetError, match="no text field 'text'; pass the right --json-keys"):
        preprocess_data(str(keyless), str(tmp_path / "k"), "NullTokenizer", vocab_size=10)
    with pytest.raises(MegahetError, match="not found"):
        preprocess_data(str(tmp_path / "none.jsonl"), str(tmp_path / "n"), "NullTokenizer", vocab_size=10)
    assert not [name for name in os.listdir(tmp_path) if name.endswith((".bin", ".idx"))]


def test_cli(corpus, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "preprocess_tool", os.path.join(os.path.dirname(__file__), "..", "..", "tools", "preprocess_data.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    argv = ["--input", corpus[0], "--output-prefix", str(tmp_path / "cli"), "--tokenizer-model", corpus[1],
            "--append-eod", "--log-interval", "100"]
    assert tool.main(argv) == 0
    assert "docs/s" in capsys.readouterr().err
    assert len(IndexedDataset(str(tmp_path / "cli"))) == len(TEXTS)
    assert tool.main(["--input", str(tmp_path / "x.jsonl"), "--output-prefix", "o", "--tokenizer-model",
                      corpus[1]]) == 2
