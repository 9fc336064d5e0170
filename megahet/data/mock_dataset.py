"""Synthetic samples for --mock-data: no files, same tokens everywhere, and a pattern a model can learn.

Tokens follow a fixed random bigram table (seeded): each token has BRANCHES possible successors with
skewed probabilities, so the achievable loss (about 1.1 nats) is far below log(vocab) and falls quickly.
Sample i depends only on (seed, split, i), so any layout reads identical batches.
"""
import numpy as np

from megahet.data import rng
from megahet.errors import MegahetError

BRANCHES = 4
_CUMULATIVE = np.cumsum([0.55, 0.25, 0.15, 0.05])
_TABLE_STREAM, _START_STREAM, _STEP_STREAM = 7, 8, 9


class MockGPTDataset:
    """`num_samples` synthetic samples of `seq_length` tokens with ids in [0, vocab_size - 1).

    The last id (NullTokenizer's eod) never appears. Items are dicts like GPTDataset's.
    """

    def __init__(self, vocab_size: int, seq_length: int, seed: int, num_samples: int, split: int = 0):
        if vocab_size < 3 or seq_length < 1 or num_samples < 0:
            raise MegahetError(f"mock data needs vocab_size >= 3, seq_length >= 1 and num_samples >= 0, got "
                               f"{vocab_size}, {seq_length}, {num_samples}; fix --vocab-size/--seq-length")
        self.vocab_size, self.seq_length, self.num_samples = vocab_size, seq_length, num_samples
        self.seed, self.split = seed, split
        ordinary = vocab_size - 1
        table = rng.hash64(seed, _TABLE_STREAM, np.arange(ordinary * BRANCHES)) % np.uint64(ordinary)
        self._successors = table.astype(np.int64).reshape(ordinary, BRANCHES).tolist()

    def __len__(self) -> int:
        return self.num_samples

    def sample_tokens(self, index: int) -> np.ndarray:
        """The seq_length + 1 tokens of sample `index`, int64."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"mock sample {index} out of range ({self.num_samples} samples)")
        count = self.seq_length + 1
        stream = self.split * 1000
        key = index * count + np.arange(count, dtype=np.uint64)
        branches = np.searchsorted(_CUMULATIVE, rng.uniform(self.seed, _STEP_STREAM + stream, key),
                                   side="right").tolist()
        token = int(rng.hash64(self.seed, _START_STREAM + stream, index) % np.uint64(self.vocab_size - 1))
        tokens = [token]
        for step in range(1, count):
            token = self._successors[token][min(branches[step], BRANCHES - 1)]
            tokens.append(token)
        return np.asarray(tokens, dtype=np.int64)

    def __getitem__(self, index: int) -> dict:
        sample = self.sample_tokens(int(index))
        return {"tokens": sample[:-1], "labels": sample[1:],
                "loss_mask": np.ones(self.seq_length, dtype=np.float32)}
