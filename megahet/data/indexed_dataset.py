"""Token datasets on disk in Megatron's format: `P.bin` holds raw token ids, `P.idx` says where each
sequence starts. Files written by Megatron-Core's `IndexedDatasetBuilder` (what Megatron's
`tools/preprocess_data.py` makes) are read as they are, and files written here open in Megatron.

`.idx` layout (little endian, Megatron-Core's `MMIDIDX` version 1):
    magic b"MMIDIDX\\0\\0" (9 bytes), uint64 version (1), uint8 dtype code (Megatron's codes:
    1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16),
    uint64 number of sequences S, uint64 number of document boundaries D + 1,
    int32[S] sequence lengths, int64[S] byte offsets in .bin, int64[D + 1] document boundaries
    (document d is sequences [doc[d], doc[d + 1])), and, for multimodal data only, int8[S] sequence modes.
megahet's extra facts (the tokenizer's vocabulary size, the largest id) go to a sidecar `P.meta.json`
that Megatron ignores; data without one (Megatron's) gets its largest id computed when the .bin is small.
The reader memory-maps both files and checks them before use, so a truncated or mismatched file fails
at start-up with the fix instead of as garbage tokens hours later.
"""
import contextlib
import json
import logging
import mmap
import os
import shutil
import struct

import numpy as np

from megahet.data.cache import atomic_write_bytes, atomic_write_json, temp_path_for
from megahet.errors import MegahetError

logger = logging.getLogger(__name__)

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, document boundaries
DTYPES = {1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16), 4: np.dtype(np.int32),
          5: np.dtype(np.int64), 6: np.dtype(np.float64), 7: np.dtype(np.float32), 8: np.dtype(np.uint16)}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
TOKEN_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int16), np.dtype(np.int32),
                np.dtype(np.int64))  # integer codes a token file may use
LEGACY_MAGIC = b"MHTIDX\x00\x00"  # megahet's own index format before it adopted Megatron's
_LEGACY_HEADER = struct.Struct("<8s6Q")
_LEGACY_DTYPES = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 3: np.dtype(np.int32), 4: np.dtype(np.int64)}
SCAN_MAX_BYTES = 1 << 30  # without a sidecar, the largest id is computed for .bin files up to this size
_FIX = "re-run tools/preprocess_data.py"


def best_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (halves disk and page cache), else int32 (Megatron's `optimal_dtype`)."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def meta_file_path(prefix: str) -> str:
    return prefix + ".meta.json"


def _pointers(lengths: np.ndarray, itemsize: int) -> np.ndarray:
    """Byte offset of each sequence when sequences are stored back to back."""
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    return pointers


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))


def index_bytes(dtype, lengths, document_indices, modes=None) -> bytes:
    """The whole `.idx` file for sequences of `lengths` (Megatron's `_IndexWriter` byte for byte)."""
    lengths = np.asarray(lengths, dtype=np.int32)
    docs = np.asarray(document_indices, dtype=np.int64)
    header = _HEADER.pack(MAGIC, VERSION, _CODES[np.dtype(dtype)], len(lengths), len(docs))
    parts = [header, lengths.tobytes(), _pointers(lengths, np.dtype(dtype).itemsize).tobytes(), docs.tobytes()]
    if modes is not None:
        parts.append(np.asarray(modes, dtype=np.int8).tobytes())
    return b"".join(parts)


class IndexedDatasetBuilder:
    """Append documents, then `finalize()` to make `prefix.bin`/`prefix.idx` appear atomically.

    Args:
        prefix: output path without extension.
        dtype: token dtype; default `best_dtype(vocab_size)`.
        vocab_size: the tokenizer's vocabulary size, kept in the sidecar so readers can detect a
            tokenizer mismatch; ids must be below it.
        multimodal: also store one int8 mode per sequence (Megatron's multimodal index).
    """

    def __init__(self, prefix: str, dtype=None, vocab_size: "int | None" = None, multimodal: bool = False):
        if dtype is None:
            if vocab_size is None:
                raise MegahetError("IndexedDatasetBuilder needs a dtype or a vocab_size to choose one")
            dtype = best_dtype(vocab_size)
        self.dtype = np.dtype(dtype)
        if self.dtype not in TOKEN_DTYPES:
            raise MegahetError(f"token dtype {self.dtype} is not supported; use one of "
                               f"{', '.join(str(d) for d in TOKEN_DTYPES)}")
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
        self._modes: "list[int] | None" = [] if multimodal else None
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

    def add_item(self, ids, mode: int = 0) -> None:
        """Append one sequence to the current document (most callers want add_document)."""
        array = np.asarray(ids)
        if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
            raise MegahetError(f"a sequence must be a 1-D list of integer ids, got shape {array.shape} "
                               f"dtype {array.dtype}")
        self._check(array)
        self._bin.write(array.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(int(array.size))
        if self._modes is not None:
            self._modes.append(int(mode))

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
        if (self._modes is None) != (other.sequence_modes is None):
            raise MegahetError(f"cannot merge {prefix} into {self.prefix}: only one of them is multimodal")
        if other.max_token_id is not None and other.max_token_id >= self._id_limit:
            raise MegahetError(f"{prefix} holds token id {other.max_token_id}, outside [0, {self._id_limit}); "
                               f"preprocess it with the same tokenizer")
        if other.max_token_id is not None:
            self._max_token = max(self._max_token, other.max_token_id)
        base = len(self._lengths)
        self._lengths.extend(other.sequence_lengths.tolist())
        self._doc_starts.extend((other.document_indices[1:] + base).tolist())
        if self._modes is not None:
            self._modes.extend(other.sequence_modes.tolist())
        other.close()
        with open(data_file_path(prefix), "rb") as source:
            shutil.copyfileobj(source, self._bin, 16 << 20)

    def finalize(self) -> str:
        """Write the index and the sidecar and move the files into place; returns the prefix."""
        if self._doc_starts[-1] != len(self._lengths):
            self.end_document()
        self._bin.close()
        data = index_bytes(self.dtype, self._lengths, self._doc_starts, self._modes)
        # .bin first: a reader that finds the new .idx must find the matching .bin.
        os.replace(self._bin_temp, data_file_path(self.prefix))
        atomic_write_bytes(index_file_path(self.prefix), data)
        write_sidecar(self.prefix, self.vocab_size, self._max_token if self._lengths else -1)
        logger.debug("wrote %s: %d documents, %d tokens", self.prefix, len(self._doc_starts) - 1,
                     sum(self._lengths))
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


def write_sidecar(prefix: str, vocab_size: "int | None", max_token_id: int) -> None:
    """megahet's facts about a dataset, tied to its index by size so a replaced .idx voids them."""
    atomic_write_json(meta_file_path(prefix), {
        "format": "megahet-dataset-meta", "version": 1, "vocab_size": vocab_size,
        "max_token_id": int(max_token_id), "index_bytes": os.path.getsize(index_file_path(prefix)),
        "data_bytes": os.path.getsize(data_file_path(prefix))})


def _read_sidecar(prefix: str) -> dict:
    try:
        with open(meta_file_path(prefix)) as handle:
            meta = json.load(handle)
    except (OSError, ValueError):
        return {}
    if not isinstance(meta, dict) or meta.get("index_bytes") != os.path.getsize(index_file_path(prefix)) or \
            meta.get("data_bytes") != os.path.getsize(data_file_path(prefix)):
        return {}  # written for other files (the dataset was replaced): ignore it
    return meta


class IndexedDataset:
    """Memory-mapped reader of `prefix.bin`/`prefix.idx`; `ds[i]` is sequence i as a read-only array.

    Attributes: dtype, sequence_lengths int32[S], sequence_pointers int64[S], document_indices
    int64[D + 1], sequence_modes int8[S] or None, vocab_size (from the sidecar, else None) and
    max_token_id (sidecar, else computed for small files, else None).
    """

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
        if raw[:8] == LEGACY_MAGIC:
            raise MegahetError(f"{idx_path} is in megahet's old index format; convert it in place with "
                               f"`python tools/preprocess_data.py --upgrade-index {self.path_prefix}`")
        if len(raw) < _HEADER.size or raw[:9] != MAGIC:
            raise MegahetError(f"{idx_path} is not a Megatron/megahet index (bad magic bytes); {_FIX}")
        _, version, code, count, doc_count = _HEADER.unpack_from(raw)
        if version != VERSION:
            raise MegahetError(f"{idx_path} has index version {version}, this megahet reads {VERSION}; {_FIX}")
        if code not in DTYPES or DTYPES[code] not in TOKEN_DTYPES:
            raise MegahetError(f"{idx_path} has dtype code {code}, not an integer token type; {_FIX}")
        plain = _HEADER.size + 4 * count + 8 * count + 8 * doc_count
        if len(raw) not in (plain, plain + count) or doc_count < 1:
            raise MegahetError(f"{idx_path} is truncated or corrupt: expected {plain} bytes "
                               f"({plain + count} with sequence modes), found {len(raw)}; {_FIX}")
        self.dtype = DTYPES[code]
        offset = _HEADER.size
        self.sequence_lengths = np.frombuffer(raw, np.int32, count, offset)
        self.sequence_pointers = np.frombuffer(raw, np.int64, count, offset + 4 * count)
        self.document_indices = np.frombuffer(raw, np.int64, doc_count, offset + 12 * count)
        self.sequence_modes = np.frombuffer(raw, np.int8, count, plain) if len(raw) > plain else None
        self.num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        self._validate(idx_path, bin_path)
        self._bin = b""
        if os.path.getsize(bin_path):
            with open(bin_path, "rb") as handle:
                self._bin = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        meta = _read_sidecar(self.path_prefix)
        self.vocab_size = meta.get("vocab_size") or None
        self.max_token_id = meta.get("max_token_id")
        if self.max_token_id is None and self.num_tokens * self.dtype.itemsize <= SCAN_MAX_BYTES:
            tokens = np.frombuffer(self._bin, dtype=self.dtype) if self.num_tokens else np.zeros(0, self.dtype)
            self.max_token_id = int(tokens.max()) if tokens.size else -1

    def _validate(self, idx_path: str, bin_path: str) -> None:
        lengths = self.sequence_lengths.astype(np.int64)
        nbytes = self.num_tokens * self.dtype.itemsize
        docs = self.document_indices
        starts = _pointers(lengths, self.dtype.itemsize)
        if (lengths < 0).any() or not np.array_equal(starts, self.sequence_pointers) or (
                docs[0] != 0 or docs[-1] != len(lengths) or (np.diff(docs) < 0).any()):
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
    def vocab_size_hint(self) -> "int | None":
        """The tokenizer vocabulary the data was written with, else the largest id + 1 (None: unknown)."""
        if self.vocab_size:
            return self.vocab_size
        return None if self.max_token_id is None else self.max_token_id + 1

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
        if self.max_token_id is None:
            logger.info("%s has no megahet sidecar and is too large to scan; token ids are not checked "
                        "against the tokenizer", self.path_prefix)
        elif self.max_token_id >= tokenizer_vocab_size:
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


def upgrade_legacy_index(prefix: str) -> str:
    """Rewrite megahet's old `.idx` (magic MHTIDX) as Megatron's, in place; the `.bin` is unchanged.

    The old header's vocabulary size and largest id move to the sidecar. Returns the prefix.
    """
    idx_path = index_file_path(prefix)
    try:
        with open(idx_path, "rb") as handle:
            raw = handle.read()
    except OSError:
        raise MegahetError(f"{idx_path} not found; pass the prefix of an existing dataset") from None
    if raw[:9] == MAGIC:
        logger.info("%s is already in Megatron's format", idx_path)
        return prefix
    if len(raw) < _LEGACY_HEADER.size or raw[:8] != LEGACY_MAGIC:
        raise MegahetError(f"{idx_path} is not a megahet index; {_FIX}")
    _, _, code, vocab, max_plus1, count, docs = _LEGACY_HEADER.unpack_from(raw)
    if code not in _LEGACY_DTYPES:
        raise MegahetError(f"{idx_path} uses a token type Megatron's format has no code for; {_FIX}")
    if len(raw) != _LEGACY_HEADER.size + 8 * count + 8 * (docs + 1) + 4 * count:
        raise MegahetError(f"{idx_path} is truncated or corrupt; {_FIX}")
    offset = _LEGACY_HEADER.size
    doc_indices = np.frombuffer(raw, np.int64, docs + 1, offset + 8 * count)
    lengths = np.frombuffer(raw, np.int32, count, offset + 8 * count + 8 * (docs + 1))
    atomic_write_bytes(idx_path, index_bytes(_LEGACY_DTYPES[code], lengths, doc_indices))
    write_sidecar(prefix, vocab or None, max_plus1 - 1)
    IndexedDataset(prefix).close()  # checks the result against the .bin
    return prefix
