"""GPT pretraining samples in Megatron-Core's order, indexed once and cached.

Sample order matches Megatron-Core 0.16's `GPTDataset` (checked against it in
tests/interop/test_megatron_samples.py) for the same data, split, seed and sample count: the documents of
one split are repeated for as many epochs as the requested samples need and shuffled by
`numpy.random.RandomState(seed)` (the last epoch apart when it would be used for less than 80% of it),
concatenated and cut into samples of seq_length + 1 tokens (consecutive samples share one token: the last
label of one is the first input of the next); the samples are then shuffled by the same random state (the
last epoch's samples apart under the same rule). Sample i starts at token i * seq_length of that stream and
is stored as (position in the document order, offset), so reading it touches only its own documents.
RandomState's stream is frozen by numpy, so every machine and numpy version builds the same order.
"""
import logging
import os

import numpy as np

from megahet.data.cache import cached_arrays
from megahet.data.indexed_dataset import IndexedDataset
from megahet.errors import MegahetError

logger = logging.getLogger(__name__)

INDEX_VERSION = 2  # 2: Megatron-Core's sample order
SPLIT_NAMES = ("train", "valid", "test")
DEFAULT_SPLIT = "969,30,1"  # Megatron's --split default
SEPARATE_LAST_EPOCH_BELOW = 0.80  # Megatron's threshold: a last epoch used less than this is shuffled apart


def parse_split(split: str) -> list[float]:
    """"98,2,0" (or "98/2/0"; fewer entries pad with 0) -> three weights that sum to 1 (Megatron's rule)."""
    try:
        weights = [float(part) for part in str(split).replace("/", ",").split(",") if part.strip()]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise MegahetError(f"--split {split!r} is not valid; give up to three non-negative weights "
                           f"for train,valid,test such as 969,30,1")
    weights += [0.0] * (3 - len(weights))
    weights = np.asarray(weights, dtype=np.float64)
    return (weights / weights.sum()).tolist()


def split_ranges(num_sequences: int, split: str) -> list[tuple[int, int]]:
    """Sequence ranges [start, end) of train, valid and test (Megatron's bookends and rounding).

    Bookends are cumulative sums of the normalised weights; split i is
    [round(b_i * n), round(b_{i+1} * n)), empty when its weight is 0.
    """
    weights = parse_split(split)
    bounds = [0.0]
    for weight in weights:
        bounds.append(bounds[-1] + weight)
    ranges = []
    for i in range(3):
        if bounds[i + 1] <= bounds[i]:
            ranges.append((0, 0))
            continue
        start = int(round(bounds[i] * float(num_sequences)))
        end = int(round(bounds[i + 1] * float(num_sequences)))
        ranges.append((start, max(start, end)))
    return ranges


def _document_order(documents: int, epochs: int, random_state, separate_last: bool) -> np.ndarray:
    """Document ids 0..documents-1 repeated `epochs` times and shuffled (Megatron's document index)."""
    if separate_last and epochs > 1:
        return np.concatenate([_document_order(documents, epochs - 1, random_state, False),
                               _document_order(documents, 1, random_state, False)])
    order = np.tile(np.arange(documents, dtype=np.int32), epochs)  # int32 as Megatron's
    random_state.shuffle(order)
    return order


def _sample_order(first: int, total: int, random_state) -> np.ndarray:
    """[0, first) shuffled, then [first, total) shuffled (Megatron's shuffle index)."""
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    head = np.arange(first, dtype=dtype)
    random_state.shuffle(head)
    if first == total:
        return head.astype(np.int64)
    tail = np.arange(first, total, dtype=dtype)
    random_state.shuffle(tail)
    return np.concatenate([head, tail]).astype(np.int64)


def build_sample_index(lengths: np.ndarray, seq_length: int, seed: int, num_samples: "int | None"):
    """Index arrays for documents of the given `lengths` (ids 0..D-1), as Megatron-Core builds them.

    Returns (doc_index int64[E*D]: document order over E epochs, sample_index int64[N, 2]:
    (position in doc_index, token offset) where each sample starts, shuffle_index int64[N]).
    N >= num_samples (one epoch's worth when num_samples is None).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    tokens_per_epoch = int(lengths.sum())
    if tokens_per_epoch <= seq_length:
        raise MegahetError(f"a split with {tokens_per_epoch} tokens cannot fill one sample of "
                           f"{seq_length + 1} tokens; use more data, a smaller --seq-length or change --split")
    needed = 1 + seq_length * (num_samples or 0)
    epochs = max(1, -(-needed // tokens_per_epoch))
    total = (epochs * tokens_per_epoch - 1) // seq_length
    separate_last, first = False, total
    if epochs > 1:
        first = ((epochs - 1) * tokens_per_epoch - 1) // seq_length  # samples before the last epoch
        per_epoch = (tokens_per_epoch - 1) // seq_length
        separate_last = num_samples - first < int(SEPARATE_LAST_EPOCH_BELOW * per_epoch)
    random_state = np.random.RandomState(seed)
    doc_index = _document_order(len(lengths), epochs, random_state, separate_last).astype(np.int64)
    ends = np.cumsum(lengths[doc_index])
    starts = np.arange(total, dtype=np.int64) * seq_length
    position = np.searchsorted(ends, starts, side="right")  # first document ending after the start
    offset = starts - (ends[position] - lengths[doc_index[position]])
    sample_index = np.stack([position, offset], axis=1)
    shuffle_index = _sample_order(first if separate_last else total, total, random_state)
    return doc_index, sample_index, shuffle_index


class GPTDataset:
    """Samples of one split of an indexed dataset; item i is a dict of numpy arrays
    tokens int64[seq], labels int64[seq] (tokens shifted by one), loss_mask float32[seq].

    Args:
        indexed: the token data.
        documents: (start, end) range of documents (sequences) forming this split.
        num_samples: samples needed; more epochs are indexed until there are enough (None: one epoch).
        cache_dir: where the index arrays are cached (default: `index_cache/` next to the data); the first
            process builds them under a lock, the others load them.
        eod_id, eod_mask_loss: with eod_mask_loss, positions whose input token is eod get loss_mask 0.
        pad_id: positions whose label is this id get loss_mask 0 (Megatron's rule; pass None when the
            tokenizer's pad id doubles as another special id, as Megatron then disables it).
    """

    def __init__(self, indexed: IndexedDataset, documents: tuple[int, int], seq_length: int, seed: int,
                 num_samples: "int | None", name: str = "train", cache_dir: "str | None" = None,
                 eod_id: "int | None" = None, eod_mask_loss: bool = False, pad_id: "int | None" = None):
        if seq_length < 1:
            raise MegahetError(f"--seq-length must be >= 1, got {seq_length}")
        if eod_mask_loss and eod_id is None:
            raise MegahetError("eod_mask_loss needs the tokenizer's eod id")
        self.indexed, self.name = indexed, name
        self.documents = (int(documents[0]), int(documents[1]))
        if not 0 <= self.documents[0] <= self.documents[1] <= len(indexed):
            raise MegahetError(f"document range {self.documents} is outside {indexed.path_prefix} "
                               f"({len(indexed)} sequences); fix the split")
        self.seq_length, self.seed, self.num_samples = seq_length, seed, num_samples
        self.eod_id, self.eod_mask_loss, self.pad_id = eod_id, eod_mask_loss, pad_id
        self._lengths = indexed.sequence_lengths[self.documents[0]:self.documents[1]]
        self.doc_index, self.sample_index, self.shuffle_index = self._load_or_build(cache_dir)

    def _description(self) -> dict:
        return {"version": INDEX_VERSION, "prefix": os.path.abspath(self.indexed.path_prefix),
                "num_sequences": len(self.indexed), "num_tokens": self.indexed.num_tokens,
                "documents": list(self.documents), "seq_length": self.seq_length, "seed": self.seed,
                "num_samples": self.num_samples}

    def _load_or_build(self, cache_dir):
        description = self._description()
        if cache_dir is None:
            cache_dir = os.path.join(os.path.dirname(description["prefix"]), "index_cache")
        return cached_arrays(cache_dir, os.path.basename(self.indexed.path_prefix), description,
                             ("doc", "sample", "shuffle"), self._build, f"{self.name} sample index")

    def _build(self):
        logger.info("building %s sample index: documents %s, seq_length %d, %s samples", self.name,
                    self.documents, self.seq_length, self.num_samples)
        doc_index, sample_index, shuffle_index = build_sample_index(
            self._lengths, self.seq_length, self.seed, self.num_samples)
        return doc_index + self.documents[0], sample_index, shuffle_index

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def sample_tokens(self, index: int) -> np.ndarray:
        """The seq_length + 1 tokens of sample `index` (in shuffled order) as int64."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for the {self.name} split ({len(self)} samples)")
        position, offset = self.sample_index[self.shuffle_index[index]]
        needed, pieces = self.seq_length + 1, []
        while needed > 0:
            doc = int(self.doc_index[position])
            take = min(needed, int(self.indexed.sequence_lengths[doc]) - int(offset))
            pieces.append(self.indexed.get(doc, int(offset), take))
            needed, position, offset = needed - take, position + 1, 0
        return np.concatenate(pieces).astype(np.int64)

    def __getitem__(self, index: int) -> dict:
        sample = self.sample_tokens(int(index))
        tokens = sample[:-1]  # [seq]
        loss_mask = np.ones(self.seq_length, dtype=np.float32)  # [seq]
        if self.eod_mask_loss:
            loss_mask[tokens == self.eod_id] = 0.0
        if self.pad_id is not None:
            loss_mask[sample[1:] == self.pad_id] = 0.0
        return {"tokens": tokens, "labels": sample[1:], "loss_mask": loss_mask}
