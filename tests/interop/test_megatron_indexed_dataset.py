"""Datasets move between Megatron-Core and megahet with no conversion, in both directions."""
import numpy as np
import pytest
import torch

from megahet.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from tests.interop.mcore import mcore

DOCS = [[5, 6, 7], [], [1], list(range(100, 150)), [0, 0, 9], [65000, 3]]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64, np.uint8])
def test_megatron_files_read_here_and_ours_are_byte_identical(tmp_path, dtype):
    m = mcore("indexed_dataset")
    docs = [[t % 250 for t in doc] for doc in DOCS] if dtype == np.uint8 else DOCS
    theirs = m.IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=dtype)
    ours = IndexedDatasetBuilder(str(tmp_path / "h"), dtype=dtype)
    for doc in docs:
        theirs.add_item(torch.tensor(doc, dtype=torch.int64))
        theirs.end_document()
        ours.add_document(doc)
    theirs.finalize(str(tmp_path / "m.idx"))
    ours.finalize()
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"m{suffix}").read_bytes() == (tmp_path / f"h{suffix}").read_bytes()
    read = IndexedDataset(str(tmp_path / "m"))
    assert [read[i].tolist() for i in range(len(docs))] == docs and read.dtype == np.dtype(dtype)
    assert read.max_token_id == max(max(d) for d in docs if d)  # no sidecar: scanned


def test_multi_sequence_documents_and_modes_both_ways(tmp_path):
    m = mcore("indexed_dataset")
    theirs = m.IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.int32, multimodal=True)
    theirs.add_document(torch.tensor([1, 2, 3, 4]), lengths=[3, 1], modes=[0, 1])
    theirs.add_item(torch.tensor([9, 8]), mode=2)
    theirs.end_document()
    theirs.finalize(str(tmp_path / "m.idx"))
    read = IndexedDataset(str(tmp_path / "m"))
    assert read.document_indices.tolist() == [0, 2, 3] and read.sequence_modes.tolist() == [0, 1, 2]
    assert [read[i].tolist() for i in range(3)] == [[1, 2, 3], [4], [9, 8]]

    ours = IndexedDatasetBuilder(str(tmp_path / "h"), dtype=np.int32, multimodal=True)
    ours.add_index(str(tmp_path / "m"))
    ours.finalize()
    back = m.IndexedDataset(str(tmp_path / "h"), multimodal=True, mmap=True)
    assert len(back) == 3 and back[2][0].tolist() == [9, 8] and back[2][1] == 2
    assert back.document_indices.tolist() == [0, 2, 3]


def test_megatron_reads_ours(tmp_path):
    m = mcore("indexed_dataset")
    ours = IndexedDatasetBuilder(str(tmp_path / "h"), vocab_size=70000)
    for doc in DOCS:
        ours.add_document(doc)
    ours.finalize()
    theirs = m.IndexedDataset(str(tmp_path / "h"))
    assert [theirs[i].tolist() for i in range(len(DOCS))] == DOCS
    assert theirs.get(3, offset=10, length=5).tolist() == list(range(110, 115))
    assert theirs.sequence_lengths.tolist() == [len(d) for d in DOCS]
