"""Checkpoint directory handling: partial (crashed) saves are never loaded, `latest` wins, pruning."""
import os

from megahet.training.checkpoint import META, _prune, find_checkpoint, list_checkpoints


def _complete(root, name):
    os.makedirs(os.path.join(root, name))
    with open(os.path.join(root, name, META), "w") as fh:
        fh.write("{}")


def test_partial_checkpoints_are_invisible(tmp_path):
    root = str(tmp_path)
    _complete(root, "iter_0000010")
    os.makedirs(os.path.join(root, "iter_0000020.partial"))  # a save that crashed half-way
    os.makedirs(os.path.join(root, "iter_0000030"))  # renamed but without meta: not complete either
    assert list_checkpoints(root) == ["iter_0000010"]
    assert find_checkpoint(root).endswith("iter_0000010")
    with open(os.path.join(root, "latest"), "w") as fh:
        fh.write("iter_0000020.partial")  # a stale pointer never selects an incomplete directory
    assert find_checkpoint(root).endswith("iter_0000010")


def test_latest_pointer_and_pruning(tmp_path):
    root = str(tmp_path)
    for i in (1, 2, 3):
        _complete(root, f"iter_{i:07d}")
    with open(os.path.join(root, "latest"), "w") as fh:
        fh.write("iter_0000002")
    assert find_checkpoint(root).endswith("iter_0000002")
    _prune(root, 2)
    assert list_checkpoints(root) == ["iter_0000002", "iter_0000003"]
    assert find_checkpoint(str(tmp_path / "nothing")) is None
