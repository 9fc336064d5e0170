"""One global sample order, whatever the parallel layout: global batch k is samples [k*G, (k+1)*G).

Replicas then take contiguous chunks of each global batch (sized by the plan, possibly unevenly), so the
same seed trains on the same samples under every layout, and resuming needs only consumed_samples.
"""
from typing import Iterator, Sequence

import numpy as np

from megahet.errors import MegahetError


class GlobalBatchSampler:
    """Yields the sample indices of successive global batches, starting after `consumed_samples`.

    Stops before a batch that would run past `dataset_len`, or, with `wrap=True` (evaluation), wraps
    indices around modulo dataset_len forever.
    """

    def __init__(self, dataset_len: int, consumed_samples: int, global_batch_size: int, wrap: bool = False):
        if global_batch_size < 1 or consumed_samples < 0 or dataset_len < 0:
            raise MegahetError(f"bad sampler settings: dataset_len={dataset_len}, consumed_samples="
                               f"{consumed_samples}, global_batch_size={global_batch_size}; "
                               f"--global-batch-size must be >= 1")
        if wrap and dataset_len == 0:
            raise MegahetError("cannot cycle over an empty dataset; give the split some documents (--split)")
        self.dataset_len, self.global_batch_size, self.wrap = dataset_len, global_batch_size, wrap
        self.consumed_samples = consumed_samples

    def __len__(self) -> int:
        """Batches left (without wrap)."""
        return max(0, (self.dataset_len - self.consumed_samples) // self.global_batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            start = self.consumed_samples
            if not self.wrap and start + self.global_batch_size > self.dataset_len:
                return
            indices = list(range(start, start + self.global_batch_size))
            if self.wrap:
                indices = [index % self.dataset_len for index in indices]
            self.consumed_samples += self.global_batch_size
            yield indices


def get_global_batch(dataset, consumed_samples: int, global_batch_size: int, wrap: bool = False) -> list:
    """The samples of the global batch that starts after `consumed_samples` (stateless; resumable)."""
    end = consumed_samples + global_batch_size
    if not wrap and end > len(dataset):
        raise MegahetError(f"the dataset has {len(dataset)} samples, the batch needs samples up to {end}; "
                           f"build the dataset for more samples (--train-iters/--train-samples)")
    if wrap and len(dataset) == 0:
        raise MegahetError("cannot cycle over an empty dataset; give the split some documents (--split)")
    return [dataset[index % len(dataset) if wrap else index] for index in range(consumed_samples, end)]


def split_for_replicas(samples: Sequence, replica_sizes: list[int]) -> list[Sequence]:
    """Replica r gets the next `replica_sizes[r]` samples (or sample indices), in order (uneven sizes allowed)."""
    if any(size < 0 for size in replica_sizes) or sum(replica_sizes) != len(samples):
        raise MegahetError(f"replica batch sizes {list(replica_sizes)} must be non-negative and sum to the "
                           f"global batch size {len(samples)}; fix the plan or --global-batch-size")
    chunks, start = [], 0
    for size in replica_sizes:
        chunks.append(samples[start:start + size])
        start += size
    return chunks


def collate(samples: list[dict]) -> dict:
    """Stack sample dicts into a batch dict of tensors: tokens/labels int64 [b, s], loss_mask fp32 [b, s]."""
    import torch  # here, so tokenizing tools and their workers do not pay for importing torch

    if not samples:
        raise MegahetError("cannot collate an empty list of samples; give every micro-batch at least one")
    from megahet.strict_devices import mark_host  # batches are host tensors until moved to the device

    return {key: mark_host(torch.from_numpy(np.stack([np.asarray(sample[key]) for sample in samples])))  # [b, s]
            for key in samples[0]}
