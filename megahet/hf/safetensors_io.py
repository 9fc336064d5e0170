"""Hugging Face safetensors folders, read and written one tensor at a time.

Reading opens one shard at a time (its memory map is dropped before the next shard is opened);
writing buffers at most `max_shard_bytes` of tensors before a shard is written, then an index
(`model.safetensors.index.json`) maps every tensor to its shard, as `save_pretrained` does.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, Iterator, Tuple

import torch

from megahet.data.cache import atomic_write_json
from megahet.errors import MegahetError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class HFWeights:
    """Tensor names and shard files of a Hugging Face model folder; `get(name)` reads one tensor."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, INDEX)
        if os.path.isfile(index):
            with open(index) as handle:
                self.weight_map: Dict[str, str] = json.load(handle)["weight_map"]
        elif os.path.isfile(os.path.join(directory, SINGLE)):
            from safetensors import safe_open
            with safe_open(os.path.join(directory, SINGLE), "pt") as handle:
                self.weight_map = {name: SINGLE for name in handle.keys()}
        else:
            raise MegahetError(f"{directory} has no {SINGLE} or {INDEX}; pass a Hugging Face model folder "
                               f"saved with safetensors")
        self._file, self._handle = None, None

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        """One tensor (a copy: nothing stays mapped once its shard is closed)."""
        from safetensors import safe_open

        if name not in self.weight_map:
            raise MegahetError(f"{self.directory} has no tensor {name}; the folder does not match its config.json")
        file = self.weight_map[name]
        if file != self._file:
            self.close()
            self._handle = safe_open(os.path.join(self.directory, file), "pt")
            self._file = file
        return self._handle.get_tensor(name).clone()

    def close(self) -> None:
        self._handle, self._file = None, None


def write_sharded(directory: str, tensors: Iterable[Tuple[str, torch.Tensor]], max_shard_bytes: int) -> Dict[str, str]:
    """Write (name, tensor) pairs as safetensors shards of at most `max_shard_bytes` (one tensor larger
    than that gets a shard of its own) plus the index; returns name -> shard file."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    shards, current, size, total = [], {}, 0, 0

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors.tmp"
            save_file(current, os.path.join(directory, name), metadata={"format": "pt"})
            shards.append((name, list(current)))
            current, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = tensor.contiguous()
        size, total = size + nbytes, total + nbytes
        del tensor
    flush()
    weight_map = {}
    for k, (temp, names) in enumerate(shards):
        final = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(os.path.join(directory, temp), os.path.join(directory, final))
        weight_map.update({name: final for name in names})
    atomic_write_json(os.path.join(directory, INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
    return weight_map


def parse_size(text: str) -> int:
    """"5GB", "500MB", "64KB" or a byte count -> bytes."""
    units = {"GB": 1 << 30, "MB": 1 << 20, "KB": 1 << 10, "B": 1}
    text = str(text).strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            try:
                return int(float(text[:-len(unit)]) * factor)
            except ValueError:
                break
    try:
        return int(text)
    except ValueError:
        raise MegahetError(f"--max-shard-size {text!r} is not a size; give e.g. 5GB or 500MB") from None
