"""Indexed dataset: round trips, merging, vocabulary checks and corruption detection."""
import os
import pickle
import subprocess
import sys

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
        handle.write(b"MMIDIDY\0\0" + raw[9:])
    with pytest.raises(MegahetError, match=r"m\.idx is not a Megatron/megahet index \(bad magic bytes\); re-run"):
        IndexedDataset(prefix)
    with open(prefix + ".idx", "wb") as handle:
        handle.write(raw[:-3])
    with pytest.raises(MegahetError, match=r"m\.idx is truncated or corrupt: expected \d+ bytes"):
        IndexedDataset(prefix)
    with open(prefix + ".idx", "wb") as handle:
        handle.write(raw[:9] + (99).to_bytes(8, "little") + raw[17:])
    with pytest.raises(MegahetError, match="index version 99"):
        IndexedDataset(prefix)
    with open(prefix + ".idx", "wb") as handle:
        handle.write(raw[:17] + bytes([6]) + raw[18:])  # float64: not a token type
    with pytest.raises(MegahetError, match="dtype code 6, not an integer token type"):
        IndexedDataset(prefix)


def test_header_bytes_are_megatrons(tmp_path):
    """Megatron's layout: magic, version, dtype code (8 = uint16), counts, lengths, pointers, documents."""
    prefix = write(tmp_path / "h", [[1, 2, 3], [4]], vocab_size=1000)
    raw = open(prefix + ".idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\0\0" and raw[9:17] == (1).to_bytes(8, "little") and raw[17] == 8
    assert raw[18:26] == (2).to_bytes(8, "little") and raw[26:34] == (3).to_bytes(8, "little")
    assert np.frombuffer(raw, np.int32, 2, 34).tolist() == [3, 1]
    assert np.frombuffer(raw, np.int64, 2, 42).tolist() == [0, 6]
    assert np.frombuffer(raw, np.int64, 3, 58).tolist() == [0, 1, 2] and len(raw) == 82


def test_multimodal_modes_round_trip(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "mm"), dtype=np.int32, multimodal=True)
    builder.add_item([1, 2], mode=0)
    builder.add_item([3], mode=1)
    builder.end_document()
    ds = IndexedDataset(builder.finalize())
    assert ds.sequence_modes.tolist() == [0, 1] and ds.document_indices.tolist() == [0, 2]
    assert ds[1].tolist() == [3]


def test_data_without_sidecar_scans_for_the_largest_id(tmp_path):
    prefix = write(tmp_path / "s", vocab_size=1000)
    os.unlink(prefix + ".meta.json")
    ds = IndexedDataset(prefix)
    assert ds.vocab_size is None and ds.max_token_id == 149


def test_stale_sidecar_is_ignored(tmp_path):
    prefix = write(tmp_path / "st", vocab_size=1000)
    meta = open(prefix + ".meta.json").read()
    write(tmp_path / "st", [[1, 2]], dtype=np.int32)  # replaced, e.g. by Megatron's tools
    open(prefix + ".meta.json", "w").write(meta)
    ds = IndexedDataset(prefix)
    assert ds.vocab_size is None and ds.max_token_id == 2


def test_legacy_megahet_index_is_refused_then_upgraded(tmp_path):
    import struct
    docs = [[5, 6, 7], [1]]
    prefix = str(tmp_path / "old")
    tokens = np.asarray([5, 6, 7, 1], dtype=np.uint16)
    tokens.tofile(prefix + ".bin")
    header = struct.pack("<8s6Q", b"MHTIDX\0\0", 1, 2, 1000, 8, 2, 2)
    body = (np.asarray([0, 6], np.int64).tobytes() + np.asarray([0, 1, 2], np.int64).tobytes()
            + np.asarray([3, 1], np.int32).tobytes())
    open(prefix + ".idx", "wb").write(header + body)
    with pytest.raises(MegahetError, match=r"old index format; convert it in place with "
                                           r"`python tools/preprocess_data.py --upgrade-index"):
        IndexedDataset(prefix)
    tool = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "preprocess_data.py")
    done = subprocess.run([sys.executable, tool, "--upgrade-index", prefix], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ds = IndexedDataset(prefix)
    assert [ds[i].tolist() for i in range(2)] == docs and ds.vocab_size == 1000 and ds.max_token_id == 7
    assert ds.dtype == np.uint16


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
