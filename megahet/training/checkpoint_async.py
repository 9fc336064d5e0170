"""--async-save: copy this rank's boxes to host memory, write them in a background thread, publish later.

The training loop stalls only for the device -> host copy (and the NaN check). The writer thread does
file I/O and hashing only, never a collective; the collective steps (agreeing that every rank wrote,
rank 0 publishing) run on the main thread, in `poll` at a step boundary once all writers are done, or
in `wait` before the next save and at exit. Until then the checkpoint is a `.partial` directory that
--load never sees, so a crash mid-write loses only that checkpoint.
"""
from __future__ import annotations

import logging
import threading
from typing import Optional

import torch

from megahet.parallel.context import ParallelContext
from megahet.training import checkpoint as ckpt

log = logging.getLogger("megahet")


class AsyncCheckpointSaver:
    """One background save at a time; every rank calls `save`, `poll` and `wait` at the same steps."""

    def __init__(self, ctx: ParallelContext, vocab_size: int):
        self.ctx, self.vocab_size = ctx, vocab_size
        self._pending: Optional[ckpt.PendingSave] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def busy(self) -> bool:
        return self._pending is not None

    def save(self, root: str, iteration: int, model_chunks, optimizer, *, meta: dict,
             keep_last: Optional[int] = None) -> None:
        """Snapshot this rank's boxes to host memory and start writing them; returns at once after."""
        self.wait()  # one save in flight: the previous must be published first
        pending, items = ckpt.begin_save(root, iteration, model_chunks, optimizer, self.ctx,
                                         vocab_size=self.vocab_size, meta=meta, keep_last=keep_last)
        snapshot = []
        for it in items:
            src = it.tensor()  # [*sizes], a view of live training state
            # Pinned host memory for device tensors: the copy runs at full DMA speed.
            host = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=src.device.type != "cpu")
            host.copy_(src)  # synchronous: the training step may overwrite src as soon as we return
            snapshot.append((it, host))
        self._pending = pending
        self._thread = threading.Thread(target=ckpt.write_items, args=(pending, self.ctx.rank, snapshot),
                                        name=f"megahet-ckpt-{iteration}", daemon=True)
        self._thread.start()

    def poll(self) -> Optional[str]:
        """At a step boundary: publish the save if every rank's writer has finished (one tiny collective,
        only while a save is in flight). Returns the published directory or None."""
        if self._pending is None:
            return None
        done = torch.tensor([0.0 if self._thread.is_alive() else 1.0], device=self.ctx.device)  # collective input
        self.ctx.world_group.all_reduce(done, op="min")
        return self._finish() if done.item() else None

    def wait(self) -> Optional[str]:
        """Block until the save in flight is written and published (before the next save, at exit)."""
        if self._pending is None:
            return None
        self._thread.join()
        return self._finish()

    def _finish(self) -> str:
        self._thread.join()
        pending, self._pending, self._thread = self._pending, None, None
        return ckpt.finish_save(pending, self.ctx, self.vocab_size)
