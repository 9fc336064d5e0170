"""The same data, seed, split and blend give the same samples in the same order as Megatron-Core
(version in tests/interop/mcore.py): document shuffling over epochs, the separate last epoch, split
rounding, blend order and sizes, per-split blends."""
import os

import numpy as np
import pytest

from megahet.data.builder import build_datasets
from megahet.data.indexed_dataset import IndexedDatasetBuilder
from megahet.tokenizer import NullTokenizer
from tests.interop.mcore import mcore

SEQ, VOCAB = 16, 1000
pytestmark = pytest.mark.filterwarnings("ignore:The pad token id in the tokenizer collides")


class MegatronTokenizer:
    """What Megatron's GPTDataset asks of a tokenizer (NullTokenizer's ids: one special id)."""
    unique_identifiers = {"class": "NullTokenizer"}
    special_tokens_dict: dict = {}

    def __init__(self, vocab_size):
        self.vocab_size, self.eod = vocab_size, vocab_size - 1
        self.pad = self.bos = self.eos = self.eod


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    root = tmp_path_factory.mktemp("mcore-data")
    rng = np.random.default_rng(0)
    out = []
    for name, docs in (("A", 200), ("B", 150), ("C", 90)):
        builder = IndexedDatasetBuilder(str(root / name), vocab_size=VOCAB)
        for _ in range(docs):
            builder.add_document(rng.integers(0, VOCAB - 1, size=int(rng.integers(1, 40))))
        out.append(builder.finalize())
    return out


def megatron_splits(blend, blend_per_split, split, sizes, seed):
    gpt = mcore("gpt_dataset")
    builder = mcore("blended_megatron_dataset_builder")
    config = gpt.GPTDatasetConfig(
        random_seed=seed, sequence_length=SEQ, blend=blend, blend_per_split=blend_per_split, split=split,
        path_to_cache=None, tokenizer=MegatronTokenizer(VOCAB), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False)
    return builder.BlendedMegatronDatasetBuilder(gpt.GPTDataset, list(sizes), lambda: True, config).build()


def assert_same(theirs, ours):
    assert (ours is None) == (theirs is None or len(theirs) == 0)
    if ours is None:
        return
    assert len(ours) == len(theirs)
    for i in range(len(ours)):
        assert ours[i]["tokens"].tolist() == theirs[i]["tokens"].tolist(), i
        assert ours[i]["labels"].tolist() == theirs[i]["labels"].tolist(), i


def weighted(prefixes, weights):
    return [str(x) for pair in zip(weights, prefixes) for x in pair]


@pytest.mark.parametrize("case", ["one-epoch", "epochs-joint-last", "epochs-separate-last", "blend",
                                  "blend-by-size", "three-way-blend"])
def test_same_samples_as_megatron(prefixes, tmp_path, case):
    # Every split with a weight must be non-empty for each dataset: Megatron-Core loops forever on an empty one.
    a = prefixes[0]
    tokens_a = int(np.fromfile(a + ".bin", dtype=np.uint16).size)
    per_epoch = int(tokens_a * 0.9 - 1) // SEQ  # about one epoch of the train split
    data, split, sizes, seed = {
        "one-epoch": ([a], "90,8,2", (per_epoch // 2, 10, 0), 3),
        "epochs-joint-last": ([a], "90,8,2", (int(per_epoch * 2.9), 30, 0), 5),
        "epochs-separate-last": ([a], "90,8,2", (int(per_epoch * 2.2), 30, 0), 5),
        "blend": (weighted(prefixes[:2], [0.3, 0.7]), "96,3,1", (700, 40, 0), 7),
        "blend-by-size": (prefixes[:2], "80,20,0", (200, 30, 0), 11),
        "three-way-blend": (weighted(prefixes, [2, 5, 3]), "90,8,2", (900, 50, 0), 13),
    }[case]
    paths, weights = data, None
    if len(data) > 1 and data[0].replace(".", "").isdigit():
        weights, paths = [float(w) for w in data[::2]], data[1::2]
    theirs = megatron_splits((paths, weights), None, split, sizes, seed)
    ours = build_datasets(data, split, SEQ, seed, sizes, NullTokenizer(VOCAB), cache_dir=str(tmp_path))
    for split_index in (0, 1):
        assert_same(theirs[split_index], ours[split_index])


def test_per_split_data_paths_match_megatron(prefixes, tmp_path):
    per_split = [(prefixes[:2], [0.4, 0.6]), ([prefixes[2]], None), None]
    sizes = (300, 40, 0)
    theirs = megatron_splits(None, per_split, None, sizes, 17)
    ours = build_datasets(None, "969,30,1", SEQ, 17, sizes, NullTokenizer(VOCAB), cache_dir=str(tmp_path),
                          split_data_paths=(weighted(prefixes[:2], [0.4, 0.6]), [prefixes[2]], None))
    assert_same(theirs[0], ours[0])
    assert_same(theirs[1], ours[1])
    assert ours[2] is None


def test_megatron_split_rounding():
    from megahet.data.gpt_dataset import split_ranges
    config = mcore("blended_megatron_dataset_config")
    for split in ("969,30,1", "98,2,0", "1,1,1", "7,2", "33.3,33.3,33.4", "0,1,0"):
        matrix = config.convert_split_vector_to_split_matrix(config.parse_and_normalize_split(split))
        for n in (1, 7, 10, 999, 1000, 12345):
            expected = [(0, 0) if m is None else (int(round(m[0] * n)), int(round(m[1] * n))) for m in matrix]
            assert split_ranges(n, split) == expected, (split, n)
