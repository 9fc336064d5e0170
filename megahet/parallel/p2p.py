"""Point-to-point transport between pipeline stages, with a shape handshake.

Every message is a small header (rank count, shape, dtype) followed by the data, so sequence length and
micro-batch size may change from step to step without the receiver knowing them in advance. A peer
in another communication domain is reached through the host (the pipeline group is then a gloo group).
Sends are non-blocking; the schedule executor waits for them before the step ends.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megahet.errors import MegahetError
from megahet.parallel.comm import CommGroup

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32]
_HEADER = 10  # [ndim, dtype code, up to 8 dims]


class _SendHandle:
    def __init__(self, works, keep):
        self._works, self._keep = works, keep

    def wait(self):
        for w in self._works:
            w.wait()
        self._works, self._keep = [], None

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self._works)


class PipelineP2P:
    """isend/recv between pipeline ranks (named by pipeline-stage index) over `pp_group`."""

    def __init__(self, pp_group: CommGroup, device: torch.device):
        self.group, self.device = pp_group, device
        # Messages travel on the group's device: the host for gloo and bridged groups.
        self.wire = pp_group.device or device

    def isend(self, tensor: torch.Tensor, peer: int, tag: int):
        if tensor.dim() > _HEADER - 2:
            raise ValueError(f"pipeline tensors may have at most {_HEADER - 2} dims, got {tensor.dim()}")
        if tensor.dtype not in _DTYPES:
            raise MegahetError(f"pipeline stages cannot send {tensor.dtype}; send one of "
                               f"{', '.join(map(str, _DTYPES))}")
        header = torch.zeros(_HEADER, dtype=torch.int64)
        header[0], header[1] = tensor.dim(), _DTYPES.index(tensor.dtype)
        header[2:2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
        header = header.to(self.wire)
        data = tensor.detach().to(self.wire).contiguous()
        dst = self.group.global_rank(peer)
        works = [dist.isend(header, dst=dst, group=self.group.pg, tag=2 * tag),
                 dist.isend(data, dst=dst, group=self.group.pg, tag=2 * tag + 1)]
        return _SendHandle(works, (header, data))

    def recv(self, peer: int, tag: int) -> torch.Tensor:
        src = self.group.global_rank(peer)
        header = torch.zeros(_HEADER, dtype=torch.int64, device=self.wire)
        dist.recv(header, src=src, group=self.group.pg, tag=2 * tag)
        header = header.cpu()
        ndim, dtype = int(header[0]), _DTYPES[int(header[1])]
        shape = [int(v) for v in header[2:2 + ndim]]
        buf = torch.empty(shape, dtype=dtype, device=self.wire)
        dist.recv(buf, src=src, group=self.group.pg, tag=2 * tag + 1)
        out = buf.to(self.device)
        assert out.device == self.device, f"pipeline message landed on {out.device}, expected {self.device}"
        return out
