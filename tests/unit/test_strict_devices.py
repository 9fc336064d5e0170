"""Strict device mode: host-born tensors bound for a native group are rejected, as nccl/hccl would."""
import pytest
import torch

from megahet import strict_devices
from megahet.errors import MegahetError
from megahet.parallel.comm import CommGroup
from megahet.testing import run_distributed


@pytest.fixture
def strict(monkeypatch):
    monkeypatch.setenv(strict_devices.ENV, "1")
    return CommGroup([0, 1], 0, library="gloo", name="dp[0, 1]", device=torch.device("cpu"))


def test_suite_runs_strict():
    assert strict_devices.enabled()  # tests/conftest.py turns it on for every test and spawned rank


def test_host_born_tensors_are_rejected(strict):
    for make in (lambda: torch.tensor([1.0], dtype=torch.float64),       # the old train_step token count
                 lambda: torch.zeros(3),
                 lambda: torch.ones(2, device=strict.device).cpu(),
                 lambda: torch.cat([torch.zeros(1), torch.ones(1)]),
                 lambda: torch.zeros(2).double()):
        with pytest.raises(MegahetError, match=r"created on the host without device=.*dp\[0, 1\]"):
            strict.check_devices(make())


def test_device_placed_tensors_pass(strict):
    strict.check_devices(torch.tensor([1.0], device=strict.device))
    strict.check_devices(torch.zeros(3).to(strict.device))             # explicitly placed
    x = torch.ones(2, 2, device=strict.device)
    strict.check_devices(x * 2, x.sum(0), torch.cat([x, x]))
    bridged = CommGroup([0, 1], 0, bridged=True, name="pp", device=torch.device("cpu"))
    bridged.check_devices(torch.zeros(3))                              # the bridge stages any device


def test_wrong_device_is_rejected_without_strict_mode(monkeypatch):
    monkeypatch.setenv(strict_devices.ENV, "0")
    group = CommGroup([0, 1], 0, library="nccl", name="dp", device=torch.device("meta"))
    group.check_devices(torch.zeros(1, device="meta"))
    with pytest.raises(MegahetError, match=r"tensor on cpu was passed to dp \(nccl\)"):
        group.check_devices(torch.zeros(1))


def _host_all_reduce(world):
    from megahet.parallel.context import build_parallel_context
    ctx = build_parallel_context(backend_name="cpu", timeout_s=30)
    try:
        ctx.world_group.all_reduce(torch.tensor([1.0]))
    except MegahetError as exc:
        return str(exc)
    return "accepted"


def test_spawned_ranks_are_strict_too():
    results = run_distributed(_host_all_reduce, 2, 2, timeout=60)
    assert all("created on the host without device=" in r for r in results)


def test_collated_batches_are_host_tensors_in_strict_mode(monkeypatch):
    """Batches come from numpy (torch.from_numpy bypasses the tagging mode): collate marks them."""
    import numpy as np
    from megahet import strict_devices
    from megahet.data.sampler import collate
    samples = [{"tokens": np.arange(4), "loss_mask": np.ones(4, dtype=np.float32)}]
    monkeypatch.setenv(strict_devices.ENV, "1")
    batch = collate(samples)
    assert strict_devices.is_host_tensor(batch["tokens"]) and strict_devices.is_host_tensor(batch["loss_mask"])
    monkeypatch.setenv(strict_devices.ENV, "0")
    assert not strict_devices.is_host_tensor(collate(samples)["tokens"])
