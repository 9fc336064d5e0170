"""The checkpoint format without processes: reader API, model-only checkpoints, integrity, full disks."""
import errno
import json
import os

import pytest
import torch

from megahet import load_model
from megahet.config import build_config
from megahet.errors import MegahetError
from megahet.models.gpt import GPTModel
from megahet.parallel.context import single_process_context
from megahet.training import checkpoint as ckpt
from megahet.training.checkpoint_format import INDEX, CheckpointReader, write_model_checkpoint

TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, seq_length=16, mock_data=True,
            vocab_size=100, make_vocab_size_divisible_by=8, micro_batch_size=2, global_batch_size=4, train_iters=1)


def test_reader_reads_tensors_and_boxes(tmp_path):
    a = torch.arange(24, dtype=torch.float32).view(4, 6)
    b = torch.randn(3, 5).to(torch.bfloat16)
    path = write_model_checkpoint(str(tmp_path), [("a", a), ("layer.b", b)], {"config": {}, "vocab_size": 7})
    assert path.endswith("iter_0000000")
    r = CheckpointReader(str(tmp_path))  # a save directory: follows `latest`
    assert r.tensor_names() == ["model/a", "model/layer.b"]
    assert r.shape("model/a") == (4, 6) and r.dtype("model/layer.b") == torch.bfloat16
    assert torch.equal(r.read("model/a"), a) and torch.equal(r.read("model/layer.b"), b)
    assert torch.equal(r.read_slice("model/a", [1, 2], [2, 3]), a[1:3, 2:5])
    assert r.meta["vocab_size"] == 7 and r.meta["model_only"]
    with pytest.raises(MegahetError, match="has no tensor model/c"):
        r.read("model/c")


def _model(cfg, ctx, vocab=100):
    return GPTModel(cfg.model, ctx, layer_ids=range(cfg.model.num_layers), pre_process=True, post_process=True,
                    vocab_size=vocab, padded_vocab_size=104, seed=5)


def test_model_only_checkpoint_loads_with_load_model(tmp_path):
    cfg = build_config(overrides=TINY)
    ctx = single_process_context("cpu")
    model = _model(cfg, ctx)
    named = [(p.global_name, p.detach().narrow(0, 0, 100) if getattr(p, "vocab_dim", None) == 0 else p.detach())
             for p in model.parameters()]
    write_model_checkpoint(str(tmp_path), named, {"config": cfg.to_dict(), "vocab_size": 100})
    tokens = torch.randint(0, 100, (2, 8))
    loaded = load_model(str(tmp_path))
    with torch.no_grad():
        want = model(tokens=tokens)
    got = loaded(tokens)
    assert got.shape == want.shape and torch.equal(got, want)


def _saved(tmp_path):
    cfg = build_config(overrides=TINY)
    ctx = single_process_context("cpu")
    model = _model(cfg, ctx)
    root = str(tmp_path / "ck")
    for it in (1, 2):
        ckpt.save_checkpoint(root, it, [model], None, ctx, vocab_size=100, meta={"config": cfg.to_dict()})
    return root, model, ctx, cfg


def test_corrupt_or_truncated_files_are_named(tmp_path):
    root, model, ctx, _ = _saved(tmp_path)
    data = os.path.join(root, "iter_0000002", "rank_00000.safetensors")
    raw = bytearray(open(data, "rb").read())
    raw[-3] ^= 0xFF
    open(data, "wb").write(bytes(raw))
    with pytest.raises(MegahetError, match=r"rank_00000.safetensors fails its sha256 checksum"):
        load_model(root)
    with pytest.raises(MegahetError, match=r"iter_0000002/rank_00000.safetensors fails its sha256.*--load-fallback"):
        ckpt.load_checkpoint(root, [model], None, ctx, vocab_size=100)
    meta = ckpt.load_checkpoint(root, [model], None, ctx, vocab_size=100, fallback=True)
    assert meta["iteration"] == 1  # the previous complete checkpoint
    open(data, "wb").write(bytes(raw[:-100]))
    with pytest.raises(MegahetError, match=r"rank_00000.safetensors has \d+ bytes but \d+ were written"):
        CheckpointReader(root).read("model/embedding.word_embeddings.weight")
    os.remove(os.path.join(root, "iter_0000002", INDEX))
    with pytest.raises(MegahetError, match=r"index.json is unreadable"):
        load_model(root)


def test_full_disk_publishes_nothing(tmp_path):
    root, model, ctx, cfg = _saved(tmp_path)

    def full_disk(path, mode):
        fh = open(path, mode)

        class Full:
            def write(self, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def __getattr__(self, name):
                return getattr(fh, name)
        return Full()
    with pytest.raises(MegahetError, match="iteration 3 failed on rank 0: No space left on device.*previous checkpoint is intact"):
        ckpt.save_checkpoint(root, 3, [model], None, ctx, vocab_size=100, meta={"config": cfg.to_dict()},
                             opener=full_disk)
    assert sorted(os.listdir(root)) == ["iter_0000001", "iter_0000002", "latest"]
    assert open(os.path.join(root, "latest")).read() == "iter_0000002"
    assert ckpt.verify_checkpoint(os.path.join(root, "iter_0000002"), ctx) is None
    with open(os.path.join(root, "iter_0000002", INDEX)) as fh:
        assert json.load(fh)["files"]["rank_00000.safetensors"]["sha256"]
