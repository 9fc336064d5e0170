"""Indexed dataset: round trips, merging, vocabulary checks and corruption detection."""
import os
import pickle

import numpy as np
import pytest

from megahet.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, best_dtype
from megahet.errors import MegahetError

DOCS = [[5, 6, 7], [], [1], list(range(100, 150)), [0, 0, 9]]


def write(prefix, docs=DOCS, **kwargs):
    builder = IndexedDatasetBuilder(str(prefix), **kwargs)
    for doc in docs:
        builder.add_document(doc)
    return builder.finalize()


@pytest.mark.parametrize("vocab_size, dtype", [(1000, np.uint16), (70000, np.int32)])
def test_round_trip(tmp_path, vocab_size, dtype):
    docs = DOCS + [[vocab_size - 1, 3]]
    ds = IndexedDataset(write(tmp_path / "d", docs, vocab_size=vocab_size))
    assert ds.dtype == np.dtype(dtype) and len(ds) == ds.num_documents == len(docs)
    for i, doc in enumerate(docs):
        assert ds[i].tolist() == doc
    assert ds[-1].tolist() == docs[-1]
    assert ds.get(3, 10, 5).tolist() == list(range(110, 115))
    assert ds.get(3, 45).tolist() == list(range(145, 150))
    assert ds.sequence_lengths.tolist() == [len(doc) for doc in docs]
    assert ds.document_indices.tolist() == list(range(len(docs) + 1))
    assert ds.num_tokens == sum(len(doc) for doc in docs)
    assert ds.vocab_size_hint == vocab_size and ds.max_token_id == vocab_size - 1
    assert os.path.getsize(str(tmp_path / "d.bin")) == ds.num_tokens * np.dtype(dtype).itemsize
    with pytest.raises(IndexError):
        ds.get(0, 2, 5)
    with pytest.raises(IndexError):
        ds[len(docs)]
    assert pickle.loads(pickle.dumps(ds))[3].tolist() == docs[3]


def test_best_dtype():
    assert best_dtype(32000) == np.uint16 and best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32 and best_dtype(152064) == np.int32


def test_multi_sequence_documents_and_merge(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "a"), dtype=np.int32)
    builder.add_item([1, 2])
    builder.add_item([3])
    builder.end_document()
    builder.add_document([4])
    ds = IndexedDataset(builder.finalize())
    assert len(ds) == 3 and ds.num_documents == 2 and ds.document_indices.tolist() == [0, 2, 3]
    write(tmp_path / "b", dtype=np.int32)
    merged = IndexedDatasetBuilder(str(tmp_path / "m"), dtype=np.int32)
    merged.add_index(str(tmp_path / "a"))
    merged.add_index(str(tmp_path / "b"))
    out = IndexedDataset(merged.finalize())
    assert [out[i].tolist() for i in range(len(out))] == [[1, 2], [3], [4]] + DOCS
    assert out.document_indices.tolist() == [0, 2, 3] + [3 + i for i in range(1, len(DOCS) + 1)]


def test_empty_dataset(tmp_path):
    ds = IndexedDataset(write(tmp_path / "e", [], vocab_size=10))
    assert len(ds) == 0 and ds.num_tokens == 0 and ds.num_documents == 0


def test_builder_rejects_bad_ids(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "x"), vocab_size=100)
    with pytest.raises(MegahetError, match="token id 100 is outside"):
        builder.add_document([1, 100])
    with pytest.raises(MegahetError, match="token id -1"):
        builder.add_document([-1])
    builder.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(MegahetError, match="does not fit"):
        IndexedDatasetBuilder(str(tmp_path / "y"), dtype=np.uint16, vocab_size=70000)


def test_truncated_bin(tmp_path):
    prefix = write(tmp_path / "t", vocab_size=1000)
    size = os.path.getsize(prefix + ".bin")
    with open(prefix + ".bin", "r+b") as handle:
        handle.truncate(size - 4)
    with pytest.raises(MegahetError) as error:
        IndexedDataset(prefix)
    message = str(error.value)
    assert f"t.bin is truncated: expected {size} bytes, found {size - 4}" in message
    assert "re-run tools/preprocess_data.py" in message and "\n" not in message


def test_bin_with_extra_bytes(tmp_path):
    prefix = write(tmp_path / "t", vocab_size=1000)
    with open(prefix + ".bin", "ab") as handle:
        handle.write(b"\0\0")
    with pytest.raises(MegahetError, match="does not match its index"):
        IndexedDataset(prefix)


def test_bad_magic_and_truncated_index(tmp_path):
    prefix = write(tmp_path / "m", vocab_size=1000)
    with open(prefix + ".idx", "rb") as handle:
        raw = handle.read()
    with open(prefix + ".idx", "wb") as handle:
        handle.write(b"MMIDIDX\0" + raw[8:])
    with pytest.raises(MegahetError, match=r"m\.idx is not a megahet index \(bad magic bytes\); re-run"):
        IndexedDataset(prefix)
    with open(prefix + ".idx", "wb") as handle:
        handle.write(raw[:-3])
    with pytest.raises(MegahetError, match=r"m\.idx is truncated or corrupt: expected \d+ bytes, found"):
        IndexedDataset(prefix)
    with open(prefix + ".idx", "wb") as handle:
        handle.write(raw[:8] + (99).to_bytes(8, "little") + raw[16:])
    with pytest.raises(MegahetError, match="index version 99"):
        IndexedDataset(prefix)


def test_missing_files(tmp_path):
    prefix = write(tmp_path / "gone", vocab_size=1000)
    os.unlink(prefix + ".idx")
    with pytest.raises(MegahetError, match=r"gone\.idx not found; check --data-path or run "
                                           r"tools/preprocess_data.py"):
        IndexedDataset(prefix)
    with pytest.raises(MegahetError, match=r"nothing\.idx not found"):
        IndexedDataset(str(tmp_path / "nothing"))


def test_vocab_mismatch(tmp_path):
    ds = IndexedDataset(write(tmp_path / "v", vocab_size=500))
    ds.check_vocab(500)
    with pytest.raises(MegahetError, match="tokenized with a vocabulary of 500, the tokenizer has 400"):
        ds.check_vocab(400)
    unknown = IndexedDataset(write(tmp_path / "u", dtype=np.int32))  # no vocab recorded: use the max id
    assert unknown.vocab_size is None and unknown.vocab_size_hint == 150
    unknown.check_vocab(150)
    with pytest.raises(MegahetError, match="holds token id 149, outside the tokenizer's vocabulary of 149"):
        unknown.check_vocab(149)
