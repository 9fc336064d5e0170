"""Build the train/valid/test datasets a run asks for: mock, one prefix, or a weighted blend."""
import logging
import math

from megahet.data.blended_dataset import BlendedDataset, parse_data_path
from megahet.data.gpt_dataset import SPLIT_NAMES, GPTDataset, split_ranges
from megahet.data.indexed_dataset import IndexedDataset
from megahet.data.mock_dataset import MockGPTDataset
from megahet.errors import MegahetError

logger = logging.getLogger(__name__)

MOCK_DEFAULT_SAMPLES = 1024  # mock splits asked for "one epoch" (num_samples None) get this many

__all__ = ["build_datasets"]


def build_datasets(data_path: "list[str] | None", split: str, seq_length: int, seed: int,
                   num_samples: tuple, tokenizer, mock: bool = False, cache_dir: "str | None" = None,
                   eod_mask_loss: bool = False) -> tuple:
    """Return (train, valid, test); an entry is None where its split is empty or asks for 0 samples.

    Args:
        data_path: [prefix] or [w1, prefix1, w2, prefix2, ...] (--data-path); prefixes without weights
            are weighted by their token counts. Ignored with mock.
        split: --split weights such as "98,2,0", applied to each prefix's documents.
        num_samples: samples needed per split; None means one epoch.
        tokenizer: checked against each dataset's vocabulary; supplies eod and, for mock, the vocab size.
        cache_dir: where sample indices are cached (default: index_cache/ next to each dataset).
    Callers that want the built-in corpus pass its prefix (`ensure_builtin_corpus().data_prefix`).
    """
    if len(num_samples) != 3:
        raise MegahetError(f"num_samples needs three entries (train, valid, test), got {num_samples}")
    if mock:
        return tuple(None if n == 0 else MockGPTDataset(tokenizer.vocab_size, seq_length, seed,
                                                        MOCK_DEFAULT_SAMPLES if n is None else n, split=i)
                     for i, n in enumerate(num_samples))
    if not data_path:
        raise MegahetError("no training data given; pass --data-path PREFIX or --mock-data")
    entries = parse_data_path(data_path)
    indexed = [IndexedDataset(prefix) for _, prefix in entries]
    for dataset in indexed:
        dataset.check_vocab(tokenizer.vocab_size)
    weights = [weight for weight, _ in entries]
    if weights[0] is None:
        total = sum(dataset.num_tokens for dataset in indexed) or 1
        weights = [dataset.num_tokens / total for dataset in indexed]
    options = dict(seq_length=seq_length, seed=seed, cache_dir=cache_dir, eod_id=tokenizer.eod,
                   eod_mask_loss=eod_mask_loss)
    return tuple(_build_split(i, indexed, weights, split, num_samples[i], options) for i in range(3))


def _sequence_range(dataset: IndexedDataset, split: str, i: int) -> tuple[int, int]:
    start, end = split_ranges(dataset.num_documents, split)[i]
    return int(dataset.document_indices[start]), int(dataset.document_indices[end])


def _build_split(i, indexed, weights, split, num_samples, options):
    name = SPLIT_NAMES[i]
    if num_samples == 0:
        return None
    parts = [(weight, dataset, _sequence_range(dataset, split, i)) for weight, dataset in zip(weights, indexed)]
    parts = [(weight, dataset, docs) for weight, dataset, docs in parts if weight > 0 and docs[1] > docs[0]]
    if not parts:
        logger.info("the %s split is empty (--split %s)", name, split)
        return None
    if len(parts) == 1:
        _, dataset, documents = parts[0]
        return GPTDataset(dataset, documents, num_samples=num_samples, name=name, **options)
    total = sum(weight for weight, _, _ in parts)
    weights = [weight / total for weight, _, _ in parts]
    datasets = [GPTDataset(dataset, documents, name=name, **options,
                           num_samples=None if num_samples is None else math.ceil(weight * num_samples) + 1)
                for weight, (_, dataset, documents) in zip(weights, parts)]
    if num_samples is None:  # one epoch of the blend: as many samples as the scarcest dataset allows
        num_samples = max(0, int(min(len(dataset) / weight for dataset, weight in zip(datasets, weights))) - 1)
    return BlendedDataset(datasets, weights, num_samples)
