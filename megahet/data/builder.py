"""Build the train/valid/test datasets a run asks for: mock, one prefix, a weighted blend, or one blend
per split (--train-data-path/--valid-data-path/--test-data-path), as Megatron-Core's
`BlendedMegatronDatasetBuilder` does (same split bookends, per-dataset sizes with its 0.5% surplus,
blend sizes and order)."""
import logging
import math

from megahet.data.blended_dataset import BlendedDataset, parse_data_path
from megahet.data.gpt_dataset import SPLIT_NAMES, GPTDataset, split_ranges
from megahet.data.indexed_dataset import IndexedDataset
from megahet.data.mock_dataset import MockGPTDataset
from megahet.errors import MegahetError

logger = logging.getLogger(__name__)

MOCK_DEFAULT_SAMPLES = 1024  # mock splits asked for "one epoch" (num_samples None) get this many
MID_LEVEL_SURPLUS = 0.005  # Megatron's mid_level_dataset_surplus: extra samples built per blended dataset

__all__ = ["build_datasets"]


def build_datasets(data_path: "list[str] | None", split: str, seq_length: int, seed: int,
                   num_samples: tuple, tokenizer, mock: bool = False, cache_dir: "str | None" = None,
                   eod_mask_loss: bool = False, split_data_paths: "tuple | None" = None) -> tuple:
    """Return (train, valid, test); an entry is None where its split is empty or asks for 0 samples.

    Args:
        data_path: [prefix] or [w1, prefix1, w2, prefix2, ...] (--data-path); prefixes without weights
            are weighted by their sample counts (Megatron). Ignored with mock.
        split: --split weights such as "969,30,1", applied to each prefix's sequences.
        num_samples: samples needed per split; None means one epoch.
        tokenizer: checked against each dataset's vocabulary; supplies eod, pad and, for mock, the vocab.
        cache_dir: where sample indices are cached (default: index_cache/ next to each dataset).
        split_data_paths: (train, valid, test) blends used instead of data_path + split, each split taking
            all of its own datasets (None entries: that split is not built).
    Callers that want the built-in corpus pass its prefix (`ensure_builtin_corpus().data_prefix`).
    """
    if len(num_samples) != 3:
        raise MegahetError(f"num_samples needs three entries (train, valid, test), got {num_samples}")
    if mock:
        return tuple(None if n == 0 else MockGPTDataset(tokenizer.vocab_size, seq_length, seed,
                                                        MOCK_DEFAULT_SAMPLES if n is None else n, split=i)
                     for i, n in enumerate(num_samples))
    pad = tokenizer.pad
    if pad in {tokenizer.eod, tokenizer.eos, tokenizer.bos}:
        pad = None  # Megatron drops a pad id that doubles as another special id
    options = dict(seq_length=seq_length, seed=seed, cache_dir=cache_dir, eod_id=tokenizer.eod,
                   eod_mask_loss=eod_mask_loss, pad_id=pad)
    opened: dict = {}
    if split_data_paths is not None:
        if data_path:
            raise MegahetError("--data-path and --train-data-path/--valid-data-path/--test-data-path are "
                               "exclusive; give one or the other")
        return tuple(None if not paths else _build_split(i, _open_blend(paths, tokenizer, opened), "1,0,0",
                                                          num_samples[i], options, all_of=True)
                     for i, paths in enumerate(split_data_paths))
    if not data_path:
        raise MegahetError("no training data given; pass --data-path PREFIX or --mock-data")
    blend = _open_blend(data_path, tokenizer, opened)
    return tuple(_build_split(i, blend, split, num_samples[i], options) for i in range(3))


def _open_blend(data_path, tokenizer, opened: dict) -> list:
    """[(weight or None, IndexedDataset)], each prefix opened (and checked) once."""
    entries, parsed = [], parse_data_path(data_path)
    if len(parsed) == 1 and len(data_path if not isinstance(data_path, str) else data_path.split()) == 1:
        parsed = [(None, parsed[0][1])]  # a lone prefix without a weight is not a blend (Megatron)
    for weight, prefix in parsed:
        if prefix not in opened:
            opened[prefix] = IndexedDataset(prefix)
            opened[prefix].check_vocab(tokenizer.vocab_size)
        entries.append((weight, opened[prefix]))
    return entries


def _build_split(i, blend, split, num_samples, options, all_of=False):
    """Split i of every dataset in the blend, blended as Megatron does."""
    name = SPLIT_NAMES[i]
    if num_samples == 0:
        return None
    split_i = 0 if all_of else i
    parts = [(weight, dataset, split_ranges(len(dataset), split)[split_i]) for weight, dataset in blend]
    parts = [(w, dataset, seqs) for w, dataset, seqs in parts if seqs[1] > seqs[0] and (w is None or w > 0)]
    if not parts:
        logger.info("the %s split is empty (--split %s)", name, split)
        return None
    if len(parts) == 1 and parts[0][0] is None:
        _, dataset, sequences = parts[0]
        return GPTDataset(dataset, sequences, num_samples=num_samples, name=name, **options)
    weights = [weight for weight, _, _ in parts]
    if weights[0] is None:  # weighted by size: one epoch of each, blended by their lengths
        datasets = [GPTDataset(dataset, sequences, num_samples=None, name=name, **options)
                    for _, dataset, sequences in parts]
        lengths = [len(dataset) for dataset in datasets]
        size = None if num_samples is None else min(num_samples, sum(lengths))
        return BlendedDataset(datasets, lengths if size is None else [float(n) for n in lengths], size,
                              cache_dir=options["cache_dir"])
    if num_samples is None:
        raise MegahetError(f"the weighted --data-path blend needs a sample count for the {name} split")
    total = math.fsum(weights)
    weights = [weight / total for weight in weights]
    target = [int(math.ceil(num_samples * weight)) for weight in weights]
    built = [int(math.ceil(n * (1 + MID_LEVEL_SURPLUS))) for n in target]
    datasets = [GPTDataset(dataset, sequences, num_samples=n, name=name, **options)
                for n, (_, dataset, sequences) in zip(built, parts)]
    return BlendedDataset(datasets, weights, sum(target), cache_dir=options["cache_dir"])
