"""GPT samples: determinism, contiguous coverage of documents, shifted labels, splits, epochs, cache."""
import os

import numpy as np
import pytest

from megahet.data.builder import build_datasets
from megahet.data.gpt_dataset import GPTDataset, parse_split, split_ranges
from megahet.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megahet.errors import MegahetError
from megahet.tokenizer import NullTokenizer

SEQ = 16


def make_data(tmp_path, num_docs=40, seed=0):
    """Document d holds tokens d*1000 + 0..len-1, so every token says where it came from."""
    lengths = np.random.default_rng(seed).integers(1, 60, size=num_docs)
    lengths[3] = 0  # an empty document must be skipped cleanly
    builder = IndexedDatasetBuilder(str(tmp_path / "docs"), vocab_size=num_docs * 1000)
    for d, length in enumerate(lengths):
        builder.add_document(d * 1000 + np.arange(length))
    return IndexedDataset(builder.finalize())


def dataset(indexed, tmp_path, documents=None, seed=1, num_samples=None, **kwargs):
    documents = documents or (0, len(indexed))
    return GPTDataset(indexed, documents, SEQ, seed, num_samples, cache_dir=str(tmp_path / "cache"), **kwargs)


def test_labels_are_shifted_tokens(tmp_path):
    ds = dataset(make_data(tmp_path), tmp_path)
    for i in range(len(ds)):
        item, raw = ds[i], ds.sample_tokens(i)
        assert item["tokens"].dtype == np.int64 and item["labels"].dtype == np.int64
        assert item["loss_mask"].dtype == np.float32 and item["loss_mask"].tolist() == [1.0] * SEQ
        assert item["tokens"].shape == item["labels"].shape == (SEQ,)
        assert item["tokens"].tolist() == raw[:-1].tolist() and item["labels"].tolist() == raw[1:].tolist()


def test_one_epoch_covers_every_document_contiguously(tmp_path):
    indexed = make_data(tmp_path)
    ds = dataset(indexed, tmp_path)
    assert sorted(ds.doc_index.tolist()) == list(range(len(indexed)))  # each document once
    stream = np.concatenate([indexed[d] for d in ds.doc_index])  # the shuffled epoch, concatenated
    assert len(ds) == (len(stream) - 1) // SEQ
    unshuffled = np.argsort(ds.shuffle_index)  # position of sample j of the stream in the shuffled order
    for j in range(len(ds)):
        sample = ds.sample_tokens(int(unshuffled[j]))
        assert sample.tolist() == stream[j * SEQ:j * SEQ + SEQ + 1].tolist()
    assert sorted(ds.shuffle_index.tolist()) == list(range(len(ds)))
    assert ds.shuffle_index.tolist() != list(range(len(ds)))


def test_same_seed_same_samples_other_seed_differs(tmp_path):
    indexed = make_data(tmp_path)
    first = dataset(indexed, tmp_path, seed=5)
    second = dataset(indexed, tmp_path / "elsewhere", seed=5)  # built afresh in another cache
    other = dataset(indexed, tmp_path, seed=6)
    assert np.array_equal(first.shuffle_index, second.shuffle_index)
    assert all(np.array_equal(first[i]["tokens"], second[i]["tokens"]) for i in range(len(first)))
    assert not np.array_equal(first.doc_index, other.doc_index)
    assert not all(np.array_equal(first[i]["tokens"], other[i]["tokens"]) for i in range(len(first)))


def test_index_is_cached_and_reused(tmp_path):
    indexed = make_data(tmp_path)
    first = dataset(indexed, tmp_path, num_samples=20)
    files = sorted(os.listdir(tmp_path / "cache"))
    assert len([name for name in files if name.endswith(".npy")]) == 3
    again = dataset(indexed, tmp_path, num_samples=20)
    assert isinstance(again.shuffle_index, np.memmap)  # loaded, not rebuilt
    assert np.array_equal(first.sample_index, again.sample_index)
    dataset(indexed, tmp_path, num_samples=21)
    assert len(os.listdir(tmp_path / "cache")) > len(files)  # other settings, other key


def test_many_epochs_when_more_samples_are_needed(tmp_path):
    indexed = make_data(tmp_path, num_docs=10)
    tokens = indexed.num_tokens
    ds = dataset(indexed, tmp_path, num_samples=3 * tokens // SEQ)
    epochs = len(ds.doc_index) // 10
    assert epochs >= 3 and len(ds) >= 3 * tokens // SEQ
    # Megatron shuffles all epochs' documents together: each document appears once per epoch
    assert np.bincount(ds.doc_index, minlength=10).tolist() == [epochs] * 10
    assert sorted(ds.shuffle_index.tolist()) == list(range(len(ds)))
    # a last epoch used for less than 80% is shuffled apart: early samples come from the complete epochs
    few = dataset(indexed, tmp_path, num_samples=(2 * tokens + tokens // 10) // SEQ)
    assert len(few.doc_index) == 30 and sorted(few.doc_index[20:].tolist()) == list(range(10))
    first = (2 * tokens - 1) // SEQ
    assert sorted(few.shuffle_index[:first].tolist()) == list(range(first))


def test_split_documents(tmp_path):
    indexed = make_data(tmp_path)
    ds = dataset(indexed, tmp_path, documents=(10, 30))
    assert sorted(ds.doc_index.tolist()) == list(range(10, 30))
    seen = {int(t) // 1000 for i in range(len(ds)) for t in ds.sample_tokens(i)}
    assert seen <= set(range(10, 30))


def test_eod_mask_loss(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "eod"), vocab_size=10)
    for _ in range(20):
        builder.add_document([1, 2, 3, 9])
    indexed = IndexedDataset(builder.finalize())
    ds = dataset(indexed, tmp_path, eod_id=9, eod_mask_loss=True)
    item = ds[0]
    assert np.array_equal(item["loss_mask"] == 0, item["tokens"] == 9) and (item["tokens"] == 9).any()


def test_parse_split_and_ranges():
    assert parse_split("98,2,0") == pytest.approx([0.98, 0.02, 0.0])
    assert parse_split("1/1") == pytest.approx([0.5, 0.5, 0.0])
    assert split_ranges(1000, "98,2,0") == [(0, 980), (980, 1000), (0, 0)]
    assert split_ranges(10, "1,1,1") == [(0, 3), (3, 7), (7, 10)]  # Megatron: round each bookend
    assert split_ranges(7, "100,0,0") == [(0, 7), (0, 0), (0, 0)]
    assert split_ranges(1000, "969,30,1") == [(0, 969), (969, 999), (999, 1000)]
    for bad in ("", "a,b", "1,-1", "0,0,0", "1,1,1,1"):
        with pytest.raises(MegahetError, match="--split"):
            parse_split(bad)


def test_too_little_data(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "tiny"), vocab_size=10)
    builder.add_document([1, 2, 3])
    with pytest.raises(MegahetError, match="cannot fill one sample"):
        dataset(IndexedDataset(builder.finalize()), tmp_path)


def test_build_datasets_splits_and_checks_vocab(tmp_path):
    indexed = make_data(tmp_path)
    tokenizer = NullTokenizer(40 * 1000)
    train, valid, test = build_datasets([indexed.path_prefix], "30,10,0", SEQ, 1, (50, None, 5), tokenizer,
                                        cache_dir=str(tmp_path / "c"))
    assert test is None and len(train) >= 50
    assert sorted(set(train.doc_index.tolist())) == list(range(0, 30))
    assert sorted(set(valid.doc_index.tolist())) == list(range(30, 40))
    with pytest.raises(MegahetError, match="vocabulary of 40000, the tokenizer has 100"):
        build_datasets([indexed.path_prefix], "1", SEQ, 1, (5, 0, 0), NullTokenizer(100))
    with pytest.raises(MegahetError, match="--data-path"):
        build_datasets(None, "1", SEQ, 1, (5, 0, 0), tokenizer)


def test_mock_data_is_deterministic_and_learnable():
    tokenizer = NullTokenizer(64)
    train, valid, test = build_datasets(None, "98,2,0", SEQ, 3, (8, 4, 0), tokenizer, mock=True)
    again, _, _ = build_datasets(None, "98,2,0", SEQ, 3, (8, 4, 0), tokenizer, mock=True)
    assert test is None and len(train) == 8 and len(valid) == 4
    assert all(np.array_equal(train[i]["tokens"], again[i]["tokens"]) for i in range(8))
    assert not np.array_equal(train[0]["tokens"], valid[0]["tokens"])
    successors = {}
    for i in range(8):
        raw = train.sample_tokens(i)
        assert raw.min() >= 0 and raw.max() < 63  # the eod id never appears
        assert np.array_equal(train[i]["labels"], raw[1:])
        for a, b in zip(raw[:-1], raw[1:]):
            successors.setdefault(int(a), set()).add(int(b))
    assert max(len(s) for s in successors.values()) <= 4  # a bigram table: loss can fall far below log(V)
