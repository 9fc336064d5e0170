"""Mix several datasets by weight (`--data-path 0.7 A 0.3 B`) in a fixed, evenly interleaved order."""
import math

import numpy as np

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
    """Which dataset, and which of its samples, each of `size` blended samples comes from.

    After any n samples dataset i must have supplied c_i with |c_i - w_i * n| < 1, so its j-th sample
    may go no earlier than step (j - 1) / w_i and no later than step j / w_i. Earliest-deadline-first
    over these windows meets every deadline (such schedules exist: Tijdeman's chairman assignment
    theorem), so the guarantee holds for every prefix; ties go to the lower dataset index.
    """
    weights = [float(w) for w in weights]
    counts = [0] * len(weights)
    dataset_index = np.empty(size, dtype=np.int32)
    sample_index = np.empty(size, dtype=np.int64)
    for n in range(1, size + 1):
        best, best_deadline = -1, math.inf
        for i, weight in enumerate(weights):
            if weight <= 0 or math.floor(counts[i] / weight) + 1 > n:  # not released yet
                continue
            deadline = math.ceil((counts[i] + 1) / weight)
            if deadline < best_deadline:
                best, best_deadline = i, deadline
        if best < 0:  # only float rounding can get here: take the dataset furthest behind
            best = max(range(len(weights)), key=lambda i: weights[i] * n - counts[i])
        dataset_index[n - 1], sample_index[n - 1] = best, counts[best]
        counts[best] += 1
    return dataset_index, sample_index


class BlendedDataset:
    """`size` samples drawn from `datasets` in the proportions `weights` (normalised here)."""

    def __init__(self, datasets: list, weights: list[float], size: int):
        if len(datasets) != len(weights) or not datasets:
            raise MegahetError(f"blending needs one weight per dataset, got {len(weights)} weights "
                               f"for {len(datasets)} datasets")
        total = float(sum(weights))
        if total <= 0 or any(w < 0 for w in weights):
            raise MegahetError(f"blend weights {weights} must be non-negative with a positive sum")
        self.datasets, self.weights, self.size = datasets, [w / total for w in weights], int(size)
        self.dataset_index, self.dataset_sample_index = blending_indices(self.weights, self.size)
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
