"""GPT pretraining samples with Megatron's semantics, indexed once and cached.

The documents of one split are shuffled per epoch (by seed), concatenated, and cut into samples of
seq_length + 1 tokens (consecutive samples share one token: the last label of one is the first input of
the next). Sample i starts at token i * seq_length of that stream and is stored as (position in the
document order, offset) so reading it touches only its own documents. Samples are then shuffled; the
last epoch is shuffled on its own so the samples a run actually uses cover whole earlier epochs first.
"""
import hashlib
import json
import logging
import os

import numpy as np

from megahet.data import rng
from megahet.data.cache import atomic_save_npy, atomic_write_json, file_lock
from megahet.data.indexed_dataset import IndexedDataset
from megahet.errors import MegahetError

logger = logging.getLogger(__name__)

INDEX_VERSION = 1
SPLIT_NAMES = ("train", "valid", "test")
_DOC_STREAM, _SAMPLE_STREAM = 0, 1 << 40  # rng streams: per-epoch document orders, then sample orders


def parse_split(split: str) -> list[float]:
    """"98,2,0" (or "98/2/0", fewer entries pad with 0) -> three weights that sum to 1."""
    try:
        weights = [float(part) for part in str(split).replace("/", ",").split(",") if part.strip()]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise MegahetError(f"--split {split!r} is not valid; give up to three non-negative weights "
                           f"for train,valid,test such as 98,2,0")
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return [w / total for w in weights]


def split_ranges(num_documents: int, split: str) -> list[tuple[int, int]]:
    """Document ranges [start, end) of train, valid and test, in document order (Megatron's rounding)."""
    bounds = [0]
    for weight in parse_split(split):
        bounds.append(bounds[-1] + int(round(weight * num_documents)))
    excess = bounds[-1] - num_documents
    bounds = [0] + [min(max(b - excess, 0), num_documents) for b in bounds[1:]]
    return [(bounds[i], max(bounds[i], bounds[i + 1])) for i in range(3)]


def build_sample_index(lengths: np.ndarray, seq_length: int, seed: int, num_samples: "int | None"):
    """Index arrays for documents of the given `lengths` (ids 0..D-1).

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
    doc_index = np.concatenate([rng.permutation(len(lengths), seed, _DOC_STREAM + e) for e in range(epochs)])
    ends = np.cumsum(lengths[doc_index])
    total = (epochs * tokens_per_epoch - 1) // seq_length
    starts = np.arange(total, dtype=np.int64) * seq_length
    position = np.searchsorted(ends, starts, side="right")  # first document ending after the start
    offset = starts - (ends[position] - lengths[doc_index[position]])
    sample_index = np.stack([position, offset], axis=1)
    # Samples that lie entirely in the first epochs-1 epochs are shuffled together, the rest apart.
    first = ((epochs - 1) * tokens_per_epoch - 1) // seq_length if epochs > 1 else total
    shuffle_index = np.concatenate([rng.permutation(first, seed, _SAMPLE_STREAM),
                                    first + rng.permutation(total - first, seed, _SAMPLE_STREAM + 1)])
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
    """

    def __init__(self, indexed: IndexedDataset, documents: tuple[int, int], seq_length: int, seed: int,
                 num_samples: "int | None", name: str = "train", cache_dir: "str | None" = None,
                 eod_id: "int | None" = None, eod_mask_loss: bool = False):
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
        self.eod_id, self.eod_mask_loss = eod_id, eod_mask_loss
        self._lengths = indexed.sequence_lengths[self.documents[0]:self.documents[1]]
        self.doc_index, self.sample_index, self.shuffle_index = self._load_or_build(cache_dir)

    def _description(self) -> dict:
        return {"version": INDEX_VERSION, "prefix": os.path.abspath(self.indexed.path_prefix),
                "num_sequences": len(self.indexed), "num_tokens": self.indexed.num_tokens,
                "documents": list(self.documents), "seq_length": self.seq_length, "seed": self.seed,
                "num_samples": self.num_samples}

    def _load_or_build(self, cache_dir):
        description = self._description()
        key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]
        if cache_dir is None:
            cache_dir = os.path.join(os.path.dirname(description["prefix"]), "index_cache")
        base = os.path.join(cache_dir, f"{os.path.basename(self.indexed.path_prefix)}-{key}")
        paths = [f"{base}-{part}.npy" for part in ("doc", "sample", "shuffle")]
        try:
            os.makedirs(cache_dir, exist_ok=True)
            with file_lock(base + ".lock"):
                if os.path.isfile(base + ".json"):
                    return tuple(np.load(path, mmap_mode="r") for path in paths)
                arrays = self._build()
                for path, array in zip(paths, arrays):
                    atomic_save_npy(path, array)
                atomic_write_json(base + ".json", description)  # written last: marks the cache complete
                return arrays
        except OSError as error:
            logger.warning("cannot cache the %s sample index in %s (%s); building it in memory",
                           self.name, cache_dir, error)
            return self._build()

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
        return {"tokens": tokens, "labels": sample[1:], "loss_mask": loss_mask}
