"""Mix several datasets by weight (`--data-path 0.7 A 0.3 B`) in Megatron-Core's order.

Sample n goes to the dataset furthest behind its share (largest w_i * max(n, 1) - c_i, ties to the
lower index), exactly Megatron-Core 0.16's `build_blending_indices`, so a blend reads the same samples in
the same order as Megatron; `exhaustive_blending_indices` is its variant for blends weighted by dataset
size without a target (every sample of every dataset exactly once).
"""

import os

import numpy as np

from megahet.data.cache import cached_arrays
from megahet.errors import MegahetError


def parse_data_path(data_path: "list[str] | str") -> list[tuple[float, str]]:
    """[prefix] or [w1, p1, w2, p2, ...] -> [(normalised weight, prefix)].

    Several prefixes without weights get weight None each (the caller weights them by token count).
    """
    if isinstance(data_path, str):
        data_path = data_path.split()
    entries = [str(entry) for entry in data_path]
    if not entries:
        raise MegahetError("--data-path is empty; give a prefix or weight/prefix pairs such as 0.7 A 0.3 B")
    if len(entries) == 1:
        return [(1.0, entries[0])]
    try:
        float(entries[0])
    except ValueError:
        return [(None, prefix) for prefix in entries]
    if len(entries) % 2:
        raise MegahetError(f"--data-path {' '.join(entries)} has an odd number of entries; "
                           f"give weight/prefix pairs such as 0.7 A 0.3 B")
    pairs = []
    for weight, prefix in zip(entries[::2], entries[1::2]):
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not value >= 0:
            raise MegahetError(f"--data-path weight {weight!r} is not a non-negative number; "
                               f"give weight/prefix pairs such as 0.7 A 0.3 B")
        pairs.append((value, prefix))
    total = sum(weight for weight, _ in pairs)
    if total <= 0:
        raise MegahetError("--data-path weights sum to zero; give at least one positive weight")
    return [(weight / total, prefix) for weight, prefix in pairs]


def blending_indices(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Which dataset (int16), and which of its samples (int64), each of `size` blended samples comes from.

    `weights` are normalised first (Megatron normalises before blending).
    """
    weights = np.asarray(weights, dtype=np.float64)
    weights = (weights / weights.sum()).tolist()
    counts = [0] * len(weights)
    dataset_index = np.empty(size, dtype=np.int16)
    sample_index = np.empty(size, dtype=np.int64)
    for n in range(size):
        step = float(max(n, 1))
        best, best_error = 0, weights[0] * step - counts[0]
        for i in range(1, len(weights)):
            error = weights[i] * step - counts[i]
            if error > best_error:
                best, best_error = i, error
        dataset_index[n], sample_index[n] = best, counts[best]
        counts[best] += 1
    return dataset_index, sample_index


def exhaustive_blending_indices(sizes) -> tuple[np.ndarray, np.ndarray]:
    """Every sample of dataset i (sizes[i] of them) exactly once, interleaved in proportion to sizes."""
    sizes = [int(size) for size in sizes]
    total = sum(sizes)
    weights = [size / float(total) for size in sizes]
    counts = [0] * len(sizes)
    unspent = [i for i in range(len(sizes)) if sizes[i] > 0]
    dataset_index = np.empty(total, dtype=np.int16)
    sample_index = np.empty(total, dtype=np.int64)
    for n in range(total):
        step = float(max(n, 1))
        best = max(unspent, key=lambda i: (weights[i] * step - counts[i], -i))
        dataset_index[n], sample_index[n] = best, counts[best]
        counts[best] += 1
        if counts[best] == sizes[best]:
            unspent.remove(best)
    return dataset_index, sample_index


class BlendedDataset:
    """Samples drawn from `datasets` in the proportions `weights`.

    With `size`, `size` samples by `blending_indices` (weights normalised here); with size None,
    `weights` are integer sample counts and every one of them is used once (`exhaustive_blending_indices`).
    """

    def __init__(self, datasets: list, weights: list, size: "int | None", cache_dir: "str | None" = None):
        if len(datasets) != len(weights) or not datasets:
            raise MegahetError(f"blending needs one weight per dataset, got {len(weights)} weights "
                               f"for {len(datasets)} datasets")
        if sum(weights) <= 0 or any(w < 0 for w in weights):
            raise MegahetError(f"blend weights {weights} must be non-negative with a positive sum")
        self.datasets = datasets
        if size is None:
            self.weights = [int(w) for w in weights]
            build = lambda: exhaustive_blending_indices(self.weights)  # noqa: E731
        else:
            total = float(sum(weights))
            self.weights = [w / total for w in weights]
            build = lambda: blending_indices(self.weights, int(size))  # noqa: E731
        self.dataset_index, self.dataset_sample_index = _cached_blend(datasets, self.weights, size, cache_dir, build)
        self.size = len(self.dataset_index)
        for i, dataset in enumerate(datasets):
            used = int((self.dataset_index == i).sum())
            if used > len(dataset):
                raise MegahetError(f"blended dataset {i} has {len(dataset)} samples but the blend needs "
                                   f"{used}; build it with more samples")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        if not 0 <= index < self.size:
            raise IndexError(f"blended sample {index} out of range ({self.size} samples)")
        return self.datasets[self.dataset_index[index]][int(self.dataset_sample_index[index])]


def _cached_blend(datasets, weights, size, cache_dir, build):
    """`build()`'s (dataset index, sample index), cached on disk next to the first dataset's sample
    index when every part is a GPTDataset (the loop costs ~3 s per million samples; Megatron caches
    its blend the same way). Keyed by the parts' own cache descriptions, the weights and the size."""
    descriptions = [getattr(d, "_description", None) for d in datasets]
    if any(desc is None for desc in descriptions):
        return build()
    described = [desc() for desc in descriptions]
    description = {"blend_version": 1, "parts": described, "weights": [repr(w) for w in weights], "size": size}
    if cache_dir is None:
        cache_dir = os.path.join(os.path.dirname(described[0]["prefix"]), "index_cache")
    return cached_arrays(cache_dir, "blend", description, ("dataset", "sample"), build, "blend index")
