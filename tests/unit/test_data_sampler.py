"""Global sample order: batches independent of layout, resumable from consumed_samples."""
import numpy as np
import pytest
import torch

from megahet.data.mock_dataset import MockGPTDataset
from megahet.data.sampler import GlobalBatchSampler, collate, get_global_batch, split_for_replicas
from megahet.errors import MegahetError


def test_batches_are_consecutive_and_stop_at_the_end():
    batches = list(GlobalBatchSampler(10, 0, 4))
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert len(GlobalBatchSampler(10, 0, 4)) == 2


def test_resume_from_consumed_samples_gives_the_same_batches():
    straight = list(GlobalBatchSampler(100, 0, 8))
    sampler = GlobalBatchSampler(100, 0, 8)
    iterator = iter(sampler)
    first = [next(iterator) for _ in range(3)]
    resumed = list(GlobalBatchSampler(100, sampler.consumed_samples, 8))
    assert sampler.consumed_samples == 24
    assert first + resumed == straight

    dataset = MockGPTDataset(50, 8, seed=0, num_samples=64)
    direct = get_global_batch(dataset, 16, 8)
    via_sampler = [dataset[i] for i in next(iter(GlobalBatchSampler(64, 16, 8)))]
    assert all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(direct, via_sampler))


def test_wrap_and_overrun():
    assert next(iter(GlobalBatchSampler(5, 4, 3, wrap=True))) == [4, 0, 1]
    dataset = MockGPTDataset(50, 8, seed=0, num_samples=5)
    assert len(get_global_batch(dataset, 4, 3, wrap=True)) == 3
    with pytest.raises(MegahetError, match="has 5 samples"):
        get_global_batch(dataset, 4, 3)


def test_split_for_replicas_keeps_order_and_allows_uneven_sizes():
    samples = list(range(8))
    assert split_for_replicas(samples, [3, 1, 4]) == [[0, 1, 2], [3], [4, 5, 6, 7]]
    assert sum(split_for_replicas(samples, [4, 4]), []) == samples
    with pytest.raises(MegahetError, match="sum to the global batch size 8"):
        split_for_replicas(samples, [4, 3])


def test_collate():
    dataset = MockGPTDataset(50, 8, seed=0, num_samples=4)
    batch = collate(get_global_batch(dataset, 0, 4))
    assert batch["tokens"].shape == batch["labels"].shape == batch["loss_mask"].shape == (4, 8)
    assert batch["tokens"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.float32
    assert torch.equal(batch["tokens"][2], torch.from_numpy(dataset[2]["tokens"]))
    with pytest.raises(MegahetError):
        collate([])
