"""The on-disk checkpoint format: per-rank safetensors files plus a JSON index. Nothing is pickled.

A checkpoint directory holds
    meta.json              iteration, config, layout, data position (written last: it marks completeness)
    index.json             every tensor by global name: shape, dtype and the stored boxes (chunks), plus
                           the byte size and sha256 of every data file
    rank_XXXXX.safetensors the slices one rank owns, each a box (offsets, sizes) of a global tensor
A rank's sidecar `rank_XXXXX.json` describes its file until rank 0 merges them into index.json.

Why not torch.distributed.checkpoint: its `.metadata` file is pickled, and its planners describe a
shard as one box of a DTensor, while a ZeRO shard of a tensor-parallel param is a flat range of a
TP-local tensor (several boxes). Plain safetensors + JSON is readable by any tool, and
`safe_open(...).get_slice` reads only the bytes a box needs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open

from megahet.data.cache import atomic_write_json
from megahet.errors import MegahetError

log = logging.getLogger("megahet")

FORMAT = "megahet-checkpoint-v2"
META = "meta.json"
INDEX = "index.json"
LATEST = "latest"
HASH_BLOCK = 4 << 20  # bytes hashed / copied at a time: the fixed buffer of streaming I/O

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
_DTYPE_NAMES = {str(t).replace("torch.", ""): t for t in _DTYPES}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPE_NAMES:
        raise MegahetError(f"checkpoint tensor dtype {name!r} is not supported; supported: {sorted(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[name]


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous CPU tensor, without copying."""
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


class ShardFileWriter:
    """Writes one safetensors file tensor by tensor (header first, then each tensor's bytes in order),
    hashing as it goes: memory is the tensor being written, never the whole file.

    Args:
        path: the file to create.
        specs: (key, dtype, shape) of every tensor, in the order `write` will be called.
        opener: how to open the file (tests pass one that fails, e.g. a full disk).
    """

    def __init__(self, path: str, specs: Sequence[Tuple[str, torch.dtype, Sequence[int]]], opener=open):
        header: Dict[str, dict] = {}
        offset = 0
        for key, dtype, shape in specs:
            nbytes = _numel(shape) * torch.empty(0, dtype=dtype).element_size()
            header[key] = {"dtype": _DTYPES[dtype], "shape": [int(s) for s in shape],
                           "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
        self.path, self.expected = path, [(k, header[k]) for k, _, _ in specs]
        self.sha = hashlib.sha256()
        self.fh = opener(path, "wb")
        self.bytes = 0
        self._next = 0
        self._put(len(raw).to_bytes(8, "little") + raw)

    def _put(self, data) -> None:
        self.fh.write(data)
        self.sha.update(data)
        self.bytes += len(data)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        want_key, info = self.expected[self._next]
        if key != want_key or list(tensor.shape) != info["shape"] or _DTYPES[tensor.dtype] != info["dtype"]:
            raise ValueError(f"tensor {key} {list(tensor.shape)} does not match the header's {want_key} {info['shape']}")
        self._next += 1
        self._put(_tensor_bytes(tensor.detach().to("cpu").contiguous()))

    def close(self) -> dict:
        """Flush to disk; returns {"bytes", "sha256"} for the index."""
        if self._next != len(self.expected):
            raise ValueError(f"{self.path}: {len(self.expected) - self._next} tensors were never written")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        return {"bytes": self.bytes, "sha256": self.sha.hexdigest()}

    def abort(self) -> None:
        try:
            self.fh.close()
        except OSError:
            pass


def _blocks(fh) -> Iterator[memoryview]:
    """The rest of an open binary file, HASH_BLOCK bytes at a time through one reused buffer."""
    buf = memoryview(bytearray(HASH_BLOCK))
    while True:
        n = fh.readinto(buf)
        if not n:
            return
        yield buf[:n]


def file_sha256(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in _blocks(fh):
            sha.update(block)
    return sha.hexdigest()


# ---------------------------------------------------------------------- index
@dataclass
class Chunk:
    """One stored box of a global tensor: `sizes` elements from `offsets`, under `key` in `file`."""
    file: str
    key: str
    offsets: List[int]
    sizes: List[int]


def write_sidecar(directory: str, rank: int, file_info: Optional[dict], entries: List[dict]) -> None:
    """This rank's part of the index (merged by `merge_index`). `entries`: name, shape, dtype, key, offsets, sizes."""
    atomic_write_json(os.path.join(directory, f"rank_{rank:05d}.json"),
                      {"file": rank_file(rank) if file_info else None, "info": file_info, "entries": entries})


def merge_index(directory: str, world_size: int) -> dict:
    """Rank 0, once every rank has written: fold the sidecars into index.json and remove them."""
    files: Dict[str, dict] = {}
    tensors: Dict[str, dict] = {}
    for rank in range(world_size):
        side = os.path.join(directory, f"rank_{rank:05d}.json")
        with open(side) as fh:
            part = json.load(fh)
        if part["file"]:
            files[part["file"]] = part["info"]
        for e in part["entries"]:
            t = tensors.setdefault(e["name"], {"shape": e["shape"], "dtype": e["dtype"], "chunks": []})
            if t["shape"] != e["shape"] or t["dtype"] != e["dtype"]:
                raise MegahetError(f"ranks disagree on the shape/dtype of {e['name']} ({t['shape']} {t['dtype']} vs "
                                   f"{e['shape']} {e['dtype']}); this is a bug in the layout, please report it")
            t["chunks"].append({"file": part["file"], "key": e["key"], "offsets": e["offsets"], "sizes": e["sizes"]})
    index = {"format": FORMAT, "files": files, "tensors": tensors}
    atomic_write_json(os.path.join(directory, INDEX), index)
    for rank in range(world_size):
        os.remove(os.path.join(directory, f"rank_{rank:05d}.json"))
    return index


def read_json(path: str, what: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise MegahetError(f"{path} is unreadable ({exc.__class__.__name__}: {exc}); the checkpoint is damaged: "
                           f"load the previous one (--load-fallback) or another --load directory") from None


def check_file(directory: str, name: str, info: dict, checksum: bool) -> None:
    """Raise a one-line MegahetError naming the file when it is missing, truncated or corrupt."""
    path = os.path.join(directory, name)
    fix = "the checkpoint is damaged: load the previous one (--load-fallback) or restore the file"
    try:
        size = os.path.getsize(path)
    except OSError:
        raise MegahetError(f"checkpoint file {path} is missing; {fix}") from None
    if size != info["bytes"]:
        raise MegahetError(f"checkpoint file {path} has {size} bytes but {info['bytes']} were written "
                           f"(truncated?); {fix}")
    if checksum and file_sha256(path) != info["sha256"]:
        raise MegahetError(f"checkpoint file {path} fails its sha256 checksum (corrupt); {fix}")


# ---------------------------------------------------------------------- reading
def find_checkpoint_dir(path: str) -> Optional[str]:
    """`path` itself when it is a complete checkpoint, else the one `latest` names, else the newest."""
    if os.path.exists(os.path.join(path, META)):
        return path
    pointer = os.path.join(path, LATEST)
    if os.path.exists(pointer):
        with open(pointer) as fh:
            target = os.path.join(path, fh.read().strip())
        if os.path.exists(os.path.join(target, META)):
            return target
    found = complete_checkpoints(path)
    return os.path.join(path, found[-1]) if found else None


def complete_checkpoints(root: str) -> List[str]:
    """Names of the complete checkpoints under a save directory, oldest first."""
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if n.startswith("iter_") and not n.endswith(".partial")
                  and os.path.exists(os.path.join(root, n, META)))


class CheckpointReader:
    """Reads tensors, or boxes of them, from a checkpoint without unpickling anything.

    Args:
        path: a checkpoint directory (iter_N) or a save directory (follows `latest`).
        verify: check each data file's size and sha256 the first time it is opened (a one-line error
            names a damaged file). Training loads verify collectively instead and pass False.
    """

    def __init__(self, path: str, verify: bool = True):
        found = find_checkpoint_dir(path)
        if found is None:
            raise MegahetError(f"no checkpoint found under {path}; pass a directory written by --save")
        self.path, self.verify = found, verify
        self.meta = read_json(os.path.join(found, META), "meta")
        if self.meta.get("format") != FORMAT:
            raise MegahetError(f"{found} is not a {FORMAT} checkpoint (format {self.meta.get('format')!r}); older "
                               f"megahet checkpoints kept pickled metadata and are not loaded: re-save with this version")
        self.index = read_json(os.path.join(found, INDEX), "index")
        self._tensors: Dict[str, dict] = self.index["tensors"]
        self._open: Dict[str, object] = {}

    def tensor_names(self, prefix: str = "model/") -> List[str]:
        return sorted(n for n in self._tensors if n.startswith(prefix))

    def has(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return dtype_from_name(self._entry(name)["dtype"])

    def files(self) -> Dict[str, dict]:
        return dict(self.index["files"])

    def _entry(self, name: str) -> dict:
        if name not in self._tensors:
            raise MegahetError(f"checkpoint {self.path} has no tensor {name}; it was saved from a different model")
        return self._tensors[name]

    def _handle(self, file: str):
        if file not in self._open:
            check_file(self.path, file, self.index["files"][file], checksum=self.verify)
            try:
                self._open[file] = safe_open(os.path.join(self.path, file), framework="pt")
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
                raise MegahetError(f"checkpoint file {os.path.join(self.path, file)} is unreadable ({exc}); the "
                                   f"checkpoint is damaged: load the previous one (--load-fallback)") from None
        return self._open[file]

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor (one at a time: for conversion and single-process loading)."""
        return self.read_slice(name, [0] * len(self.shape(name)), list(self.shape(name)))

    def read_slice(self, name: str, offsets: Sequence[int], sizes: Sequence[int],
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The box `sizes` from `offsets` of tensor `name`, read from only the stored chunks it overlaps.

        `out` (shape `sizes`, any device/dtype) receives the values in place when given.
        """
        entry = self._entry(name)
        if len(offsets) != len(entry["shape"]) or len(sizes) != len(entry["shape"]):
            raise ValueError(f"{name} has {len(entry['shape'])} dims; got offsets {list(offsets)} sizes {list(sizes)}")
        if any(o < 0 or o + s > d for o, s, d in zip(offsets, sizes, entry["shape"])):
            raise ValueError(f"box {list(offsets)}+{list(sizes)} is outside {name} {entry['shape']}")
        if out is None:
            out = torch.empty(list(sizes), dtype=dtype_from_name(entry["dtype"]))
        covered = 0
        for c in entry["chunks"]:
            lo = [max(o, co) for o, co in zip(offsets, c["offsets"])]
            hi = [min(o + s, co + cs) for o, s, co, cs in zip(offsets, sizes, c["offsets"], c["sizes"])]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            src = self._handle(c["file"]).get_slice(c["key"])
            part = src[tuple(slice(a - co, b - co) for a, b, co in zip(lo, hi, c["offsets"]))] if lo else src[:]
            dst = out
            for d, (a, b, o) in enumerate(zip(lo, hi, offsets)):
                dst = dst.narrow(d, a - o, b - a)
            dst.copy_(part)
            covered += _numel([b - a for a, b in zip(lo, hi)])
        if covered != _numel(sizes):
            raise MegahetError(f"checkpoint {self.path} covers only {covered} of the {_numel(sizes)} elements of "
                               f"{name} at {list(offsets)}+{list(sizes)}: it is incomplete; load the previous one")
        return out

    def close(self) -> None:
        self._open.clear()


# ---------------------------------------------------------------------- model-only checkpoints
def write_model_checkpoint(path: str, named_tensors: Iterable[Tuple[str, torch.Tensor]], meta: dict) -> str:
    """Write a model-only checkpoint (one file) from (name, full tensor) pairs, one tensor in memory at a time.

    `path` is a save directory: the checkpoint becomes `path/iter_XXXXXXX` (meta["iteration"], default 0)
    and `latest` points at it, so --load / --finetune and load_model accept `path`. Names are global
    parameter names without the "model/" prefix (added here). `meta` must hold "config" (a
    MegahetConfig dict) and "vocab_size". Returns the checkpoint directory.
    """
    from megahet.data.cache import atomic_write_bytes

    for key in ("config", "vocab_size"):
        if key not in meta:
            raise MegahetError(f"write_model_checkpoint needs meta[{key!r}]; pass the model config and vocabulary size")
    iteration = int(meta.get("iteration", 0))
    final = os.path.join(path, f"iter_{iteration:07d}")
    partial = final + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    file = rank_file(0)
    # Header sizes are unknown until every tensor was seen: stream the data to a spool file first,
    # then write header + data (copied HASH_BLOCK bytes at a time).
    specs, entries = [], []
    spool = tempfile.NamedTemporaryFile(dir=partial, delete=False)
    try:
        for name, tensor in named_tensors:
            t = tensor.detach().to("cpu").contiguous()
            key = f"model/{name}"
            specs.append((key, t.dtype, tuple(t.shape)))
            entries.append({"name": key, "shape": list(t.shape), "dtype": dtype_name(t.dtype), "key": key,
                            "offsets": [0] * t.dim(), "sizes": list(t.shape)})
            spool.write(_tensor_bytes(t))
        spool.close()
        writer = ShardFileWriter(os.path.join(partial, file), specs)
        with open(spool.name, "rb") as src:
            for block in _blocks(src):
                writer._put(block)
        writer._next = len(specs)
        info = writer.close()
    finally:
        if os.path.exists(spool.name):
            os.remove(spool.name)
    write_sidecar(partial, 0, info, entries)
    merge_index(partial, 1)
    full_meta = dict(meta, format=FORMAT, iteration=iteration, world_size=1, model_only=True,
                     layout=meta.get("layout", dict(tp=1, pp=1, dp=1, ep=1)))
    atomic_write_json(os.path.join(partial, META), full_meta)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(partial, final)
    atomic_write_bytes(os.path.join(path, LATEST), os.path.basename(final).encode())
    return final
