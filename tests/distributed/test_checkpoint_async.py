"""--async-save writes bit-identical checkpoints to synchronous saves while training goes on."""
import os

import torch

from megahet.testing import run_distributed
from megahet.training.checkpoint_format import CheckpointReader
from tests.distributed.train_cases import losses, train


def test_async_save_equals_sync_save(tmp_path):
    runs = {}
    for mode in ("sync", "async"):
        ck = str(tmp_path / mode)
        over = {"metrics_file": str(tmp_path / f"{mode}.jsonl"), "train_iters": 5, "save": ck, "save_interval": 2,
                "use_distributed_optimizer": True, "keep_last": 2, "async_save": mode == "async"}
        runs[mode] = (ck, losses(run_distributed(train, 2, over, timeout=180)[0]))
    (sync_dir, sync_losses), (async_dir, async_losses) = runs["sync"], runs["async"]
    assert sync_losses == async_losses
    assert sorted(os.listdir(async_dir)) == ["iter_0000004", "iter_0000005", "latest"]  # pruned, all published
    for it in ("iter_0000004", "iter_0000005"):
        a, b = CheckpointReader(os.path.join(sync_dir, it)), CheckpointReader(os.path.join(async_dir, it))
        names = a.tensor_names("")
        assert names == b.tensor_names("") and any(n.startswith("optim/") for n in names)
        for n in names:
            assert torch.equal(a.read(n), b.read(n)), (it, n)
        assert {k: v for k, v in a.meta.items() if k != "config"} == {k: v for k, v in b.meta.items() if k != "config"}
