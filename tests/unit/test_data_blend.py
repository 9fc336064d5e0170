"""Blending: --data-path parsing and the per-prefix ratio."""
import numpy as np
import pytest

from megahet.data.blended_dataset import BlendedDataset, blending_indices, parse_data_path
from megahet.data.builder import build_datasets
from megahet.data.indexed_dataset import IndexedDatasetBuilder
from megahet.errors import MegahetError
from megahet.tokenizer import NullTokenizer


def test_parse_data_path():
    assert parse_data_path(["data/a"]) == [(1.0, "data/a")]
    assert parse_data_path(["0.7", "A", "0.3", "B"]) == [(0.7, "A"), (0.3, "B")]
    assert parse_data_path("2 A 6 B") == [(0.25, "A"), (0.75, "B")]
    assert parse_data_path(["A", "B"]) == [(None, "A"), (None, "B")]
    for bad, message in ((["0.5", "A", "0.5"], "odd number"), (["1", "A", "x", "B"], "not a non-negative"),
                         (["0", "A", "0", "B"], "sum to zero"), ([], "empty")):
        with pytest.raises(MegahetError, match=message):
            parse_data_path(bad)


@pytest.mark.parametrize("weights", [[0.7, 0.3], [1 / 3] * 3, [0.5, 0.25, 0.125, 0.125], [0.01, 0.99],
                                     [0.05, 0.1, 0.15, 0.2, 0.5], list(np.random.default_rng(0).random(6))])
def test_every_prefix_stays_close_to_its_weight(weights):
    """Megatron's greedy blend keeps every prefix within two samples of its share (exact order: interop tests)."""
    weights = np.asarray(weights) / np.sum(weights)
    size = 3000
    dataset_index, sample_index = blending_indices(weights, size)
    counts = np.cumsum(np.eye(len(weights))[dataset_index], axis=0)  # [n, datasets] after n+1 samples
    targets = np.arange(1, size + 1)[:, None] * weights[None, :]
    assert np.abs(counts - targets).max() <= 2.0
    for i in range(len(weights)):  # each dataset is read in order 0, 1, 2, ...
        assert sample_index[dataset_index == i].tolist() == list(range(int((dataset_index == i).sum())))


def test_blending_is_deterministic():
    first, _ = blending_indices([0.2, 0.3, 0.5], 500)
    second, _ = blending_indices([0.2, 0.3, 0.5], 500)
    assert np.array_equal(first, second)


def test_blended_dataset_reads_the_right_samples():
    blended = BlendedDataset([[f"a{i}" for i in range(10)], [f"b{i}" for i in range(10)]], [3, 1], 8)
    assert [blended[i] for i in range(8)].count("b0") == 1
    assert sorted(blended[i] for i in range(8)) == ["a0", "a1", "a2", "a3", "a4", "a5", "b0", "b1"]
    with pytest.raises(MegahetError, match="needs"):
        BlendedDataset([[1], [2]], [0.5, 0.5], 4)


def _two_datasets(tmp_path):
    """Prefixes of datasets A and B: 50 documents of 30 tokens each, all 0 in A and all 1 in B."""
    prefixes = []
    for d, name in enumerate("AB"):
        builder = IndexedDatasetBuilder(str(tmp_path / name), vocab_size=3)
        for _ in range(50):
            builder.add_document([d] * 30)
        prefixes.append(builder.finalize())
    return prefixes


def test_build_blend_from_data_path(tmp_path):
    prefixes = _two_datasets(tmp_path)
    train, valid, _ = build_datasets(["0.75", prefixes[0], "0.25", prefixes[1]], "90,10,0", 8, 1, (200, 20, 0),
                                     NullTokenizer(3), cache_dir=str(tmp_path / "c"))
    assert len(train) == 200 and len(valid) == 20
    source = [int(train[i]["tokens"][0]) for i in range(200)]
    assert source.count(0) == 150 and source.count(1) == 50


def test_blend_index_is_cached_and_reused(tmp_path, monkeypatch):
    """The blend's index is built once, written next to the sample indices, and read back identically."""
    import megahet.data.blended_dataset as blended_module
    prefixes = _two_datasets(tmp_path)
    args = (["0.75", prefixes[0], "0.25", prefixes[1]], "90,10,0", 8, 1, (200, 20, 0), NullTokenizer(3))
    first, _, _ = build_datasets(*args, cache_dir=str(tmp_path / "c"))
    assert len(list((tmp_path / "c").glob("blend-*.json"))) == 2  # train and valid blends
    monkeypatch.setattr(blended_module, "blending_indices", lambda *a: pytest.fail("rebuilt a cached blend"))
    again, _, _ = build_datasets(*args, cache_dir=str(tmp_path / "c"))
    assert np.array_equal(again.dataset_index, first.dataset_index)
    assert np.array_equal(again.dataset_sample_index, first.dataset_sample_index)
