"""Token datasets on disk: `P.bin` holds raw token ids, `P.idx` says where each sequence starts.

`.idx` layout (little endian):
    header: magic b"MHTIDX\\0\\0", then uint64 version, dtype code, tokenizer vocab size (0 = unknown),
            max token id + 1, number of sequences S, number of documents D
    int64[S]     byte offset of each sequence in .bin
    int64[D + 1] document boundaries: document d is sequences [doc[d], doc[d + 1])
    int32[S]     length of each sequence in tokens
The reader memory-maps both files and checks them before use, so a truncated or mismatched file fails
at start-up with the fix instead of as garbage tokens hours later.
"""
import contextlib
import logging
import mmap
import os
import shutil
import struct

import numpy as np

from megahet.data.cache import atomic_write_bytes, temp_path_for
from megahet.errors import MegahetError

logger = logging.getLogger(__name__)

MAGIC = b"MHTIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<8s6Q")
DTYPES = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 3: np.dtype(np.int32), 4: np.dtype(np.int64),
          5: np.dtype(np.uint32)}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
_FIX = "re-run tools/preprocess_data.py"


def best_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (halves disk and page cache), else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def _pointers(lengths: np.ndarray, itemsize: int) -> np.ndarray:
    """Byte offset of each sequence when sequences are stored back to back."""
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    return pointers


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))


class IndexedDatasetBuilder:
    """Append documents, then `finalize()` to make `prefix.bin`/`prefix.idx` appear atomically.

    Args:
        prefix: output path without extension.
        dtype: token dtype; default `best_dtype(vocab_size)`.
        vocab_size: the tokenizer's vocabulary size, stored so readers can detect a tokenizer mismatch;
            ids must be below it.
    """

    def __init__(self, prefix: str, dtype=None, vocab_size: "int | None" = None):
        if dtype is None:
            if vocab_size is None:
                raise MegahetError("IndexedDatasetBuilder needs a dtype or a vocab_size to choose one")
            dtype = best_dtype(vocab_size)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODES:
            raise MegahetError(f"token dtype {self.dtype} is not supported; use one of "
                               f"{', '.join(str(d) for d in DTYPES.values())}")
        limit = np.iinfo(self.dtype).max + 1
        if vocab_size is not None and vocab_size > limit:
            raise MegahetError(f"vocab size {vocab_size} does not fit token dtype {self.dtype}; "
                               f"use int32 (or leave dtype unset)")
        self.prefix = os.fspath(prefix)
        self.vocab_size = vocab_size
        self._id_limit = vocab_size if vocab_size is not None else limit
        self._max_token = -1
        self._lengths: list[int] = []
        self._doc_starts: list[int] = [0]
        self._bin_temp = temp_path_for(data_file_path(self.prefix))
        self._bin = open(self._bin_temp, "wb")

    def _check(self, array: np.ndarray) -> None:
        if array.size == 0:
            return
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= self._id_limit:
            bad = low if low < 0 else high
            raise MegahetError(f"token id {bad} is outside [0, {self._id_limit}) for {self.prefix}; "
                               f"the tokenizer and --vocab-size/dtype do not match")
        self._max_token = max(self._max_token, high)

    def add_item(self, ids) -> None:
        """Append one sequence to the current document (most callers want add_document)."""
        array = np.asarray(ids)
        if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
            raise MegahetError(f"a sequence must be a 1-D list of integer ids, got shape {array.shape} "
                               f"dtype {array.dtype}")
        self._check(array)
        self._bin.write(array.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(int(array.size))

    def end_document(self) -> None:
        """Close the current document (the sequences added since the last call)."""
        self._doc_starts.append(len(self._lengths))

    def add_document(self, ids) -> None:
        """Append one document made of a single sequence."""
        self.add_item(ids)
        self.end_document()

    def add_index(self, prefix: str) -> None:
        """Append every document of the dataset at `prefix` (used to merge shards)."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise MegahetError(f"cannot merge {prefix} ({other.dtype}) into {self.prefix} ({self.dtype}); "
                               f"preprocess both with the same tokenizer")
        if other.max_token_id >= self._id_limit:
            raise MegahetError(f"{prefix} holds token id {other.max_token_id}, outside [0, {self._id_limit}); "
                               f"preprocess it with the same tokenizer")
        self._max_token = max(self._max_token, other.max_token_id)
        base = len(self._lengths)
        self._lengths.extend(other.sequence_lengths.tolist())
        self._doc_starts.extend((other.document_indices[1:] + base).tolist())
        other.close()
        with open(data_file_path(prefix), "rb") as source:
            shutil.copyfileobj(source, self._bin, 16 << 20)

    def finalize(self) -> str:
        """Write the index and move both files into place; returns the prefix."""
        if self._doc_starts[-1] != len(self._lengths):
            self.end_document()
        self._bin.close()
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = _pointers(lengths, self.dtype.itemsize)
        docs = np.asarray(self._doc_starts, dtype=np.int64)
        header = _HEADER.pack(MAGIC, VERSION, _CODES[self.dtype], self.vocab_size or 0,
                              self._max_token + 1, len(lengths), len(docs) - 1)
        # .bin first: a reader that finds the new .idx must find the matching .bin.
        os.replace(self._bin_temp, data_file_path(self.prefix))
        atomic_write_bytes(index_file_path(self.prefix),
                           header + pointers.tobytes() + docs.tobytes() + lengths.tobytes())
        logger.debug("wrote %s: %d documents, %d tokens", self.prefix, len(docs) - 1, int(lengths.sum()))
        return self.prefix

    def abort(self) -> None:
        """Drop everything written so far (no output files appear)."""
        self._bin.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._bin_temp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif not self._bin.closed:
            self.finalize()


class IndexedDataset:
    """Memory-mapped reader of `prefix.bin`/`prefix.idx`; `ds[i]` is sequence i as a read-only array."""

    def __init__(self, prefix: str):
        self.path_prefix = os.fspath(prefix)
        self._open()

    def _open(self) -> None:
        idx_path, bin_path = index_file_path(self.path_prefix), data_file_path(self.path_prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise MegahetError(f"{path} not found; check --data-path or run tools/preprocess_data.py "
                                   f"--output-prefix {self.path_prefix}")
        with open(idx_path, "rb") as handle:
            raw = handle.read()
        if len(raw) < _HEADER.size or raw[:8] != MAGIC:
            raise MegahetError(f"{idx_path} is not a megahet index (bad magic bytes); {_FIX}")
        _, version, code, vocab, max_plus1, count, docs = _HEADER.unpack_from(raw)
        if version != VERSION:
            raise MegahetError(f"{idx_path} has index version {version}, this megahet reads {VERSION}; {_FIX}")
        if code not in DTYPES:
            raise MegahetError(f"{idx_path} has unknown dtype code {code}; {_FIX}")
        expected = _HEADER.size + 8 * count + 8 * (docs + 1) + 4 * count
        if len(raw) != expected:
            raise MegahetError(f"{idx_path} is truncated or corrupt: expected {expected} bytes, "
                               f"found {len(raw)}; {_FIX}")
        self.dtype = DTYPES[code]
        self.vocab_size = vocab or None
        self.max_token_id = max_plus1 - 1
        offset = _HEADER.size
        self.sequence_pointers = np.frombuffer(raw, np.int64, count, offset)
        self.document_indices = np.frombuffer(raw, np.int64, docs + 1, offset + 8 * count)
        self.sequence_lengths = np.frombuffer(raw, np.int32, count, offset + 8 * count + 8 * (docs + 1))
        self.num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        self._validate(idx_path, bin_path)
        self._bin = b""
        if os.path.getsize(bin_path):
            with open(bin_path, "rb") as handle:
                self._bin = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)

    def _validate(self, idx_path: str, bin_path: str) -> None:
        lengths = self.sequence_lengths.astype(np.int64)
        nbytes = self.num_tokens * self.dtype.itemsize
        docs = self.document_indices
        starts = _pointers(lengths, self.dtype.itemsize)
        if (lengths < 0).any() or not np.array_equal(starts, self.sequence_pointers) or (
                len(docs) and (docs[0] != 0 or docs[-1] != len(lengths) or (np.diff(docs) < 0).any())):
            raise MegahetError(f"{idx_path} is corrupt (inconsistent offsets); {_FIX}")
        found = os.path.getsize(bin_path)
        if found < nbytes:
            raise MegahetError(f"{bin_path} is truncated: expected {nbytes} bytes, found {found}; {_FIX}")
        if found > nbytes:
            raise MegahetError(f"{bin_path} does not match its index: expected {nbytes} bytes, "
                               f"found {found}; {_FIX}")

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def vocab_size_hint(self) -> int:
        """The tokenizer vocabulary the data was written with, else the largest id + 1."""
        return self.vocab_size if self.vocab_size else self.max_token_id + 1

    def get(self, index: int, offset: int = 0, length: "int | None" = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence `index` (to its end when length is None)."""
        size = int(self.sequence_lengths[index])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {index} "
                             f"of length {size} in {self.path_prefix}")
        start = int(self.sequence_pointers[index]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=start)

    def __getitem__(self, index: int) -> np.ndarray:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sequence {index} out of range for {self.path_prefix} ({len(self)} sequences)")
        return self.get(index % len(self))

    def check_vocab(self, tokenizer_vocab_size: int) -> None:
        """Raise if this data was written with a different tokenizer vocabulary."""
        if self.vocab_size is not None and self.vocab_size != tokenizer_vocab_size:
            raise MegahetError(f"{self.path_prefix} was tokenized with a vocabulary of {self.vocab_size}, "
                               f"the tokenizer has {tokenizer_vocab_size}; pass the matching "
                               f"--tokenizer-model or {_FIX} with this tokenizer")
        if self.max_token_id >= tokenizer_vocab_size:
            raise MegahetError(f"{self.path_prefix} holds token id {self.max_token_id}, outside the "
                               f"tokenizer's vocabulary of {tokenizer_vocab_size}; pass the matching "
                               f"--tokenizer-model or {_FIX} with this tokenizer")

    def close(self) -> None:
        """Drop this reader's memory map (arrays already returned keep it alive; reads fail afterwards)."""
        self._bin = b""

    def __getstate__(self):
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state):
        self.path_prefix = state["path_prefix"]
        self._open()

    def __repr__(self) -> str:
        return f"IndexedDataset({self.path_prefix!r}, sequences={len(self)}, dtype={self.dtype})"
