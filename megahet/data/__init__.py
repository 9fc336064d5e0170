"""Data pipeline: indexed token datasets, GPT samples, blending, mock data and the built-in corpus."""
from megahet.data.blended_dataset import BlendedDataset, blending_indices, parse_data_path
from megahet.data.builder import build_datasets
from megahet.data.corpus import BuiltinData, ensure_builtin_corpus
from megahet.data.gpt_dataset import GPTDataset, parse_split, split_ranges
from megahet.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, best_dtype
from megahet.data.mock_dataset import MockGPTDataset
from megahet.data.preprocess import preprocess_data
from megahet.data.sampler import GlobalBatchSampler, collate, get_global_batch, split_for_replicas

__all__ = ["BlendedDataset", "blending_indices", "parse_data_path", "build_datasets", "BuiltinData",
           "ensure_builtin_corpus", "GPTDataset", "parse_split", "split_ranges", "IndexedDataset",
           "IndexedDatasetBuilder", "best_dtype", "MockGPTDataset", "preprocess_data", "GlobalBatchSampler",
           "collate", "get_global_batch", "split_for_replicas"]
