"""Backend registry, the built-in backends' attributes, and the sim backend's slowdown."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap

import pytest
import torch

import megahet.device as device_mod
from megahet.backends import cuda as cuda_mod
from megahet.backends import npu as npu_mod
from megahet.backends import sim as sim_mod
from megahet.device import (Backend, default_backend_name, describe_backends, get_backend,
                            register_backend, registered_backends)
from megahet.errors import MegahetError
from megahet.kernels import Kernels

BUILTINS = {"cpu": ("cpu", "gloo", "cpu"), "sim": ("cpu", "gloo", "sim"),
            "cuda": ("cuda", "nccl", "cuda"), "npu": ("npu", "hccl", "npu")}


@pytest.fixture
def clean_registry(monkeypatch):
    """Run-time registrations made by a test disappear after it."""
    monkeypatch.setattr(device_mod, "_REGISTERED", {})
    monkeypatch.setattr(device_mod, "_LOADED", dict(device_mod._LOADED))


@pytest.fixture
def fixed_measurement(monkeypatch):
    """Replace the matmul benchmark by a constant so peak_flops tests are exact and instant."""
    monkeypatch.setattr(device_mod, "measure_matmul_flops", lambda backend, dtype, **kw: 1e11)


# -- discovery ------------------------------------------------------------------------------------
def test_entry_points_are_discoverable():
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="megahet.backends")}
    assert set(BUILTINS) <= set(eps)
    for name in BUILTINS:
        cls = eps[name].load()
        assert issubclass(cls, Backend) and cls.name == name


def test_registered_backends_lists_builtins():
    assert set(BUILTINS) <= set(registered_backends())
    assert registered_backends() == sorted(registered_backends())


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_attributes(name):
    backend = get_backend(name)
    assert (backend.device_type, backend.collective_backend, backend.domain) == BUILTINS[name]
    assert backend.name == name


def test_unknown_backend_error_lists_registered_names():
    with pytest.raises(MegahetError, match=r"unknown backend 'tpu'; registered backends: cpu, cuda, "
                                           r"npu, sim"):
        get_backend("tpu")


def test_unknown_option_is_named():
    with pytest.raises(MegahetError, match="backend 'cpu' has no option.* speed; its options are: "
                                           "peak_tflops"):
        get_backend("cpu", speed=0.5)


def test_describe_backends_reports_availability():
    rows = {row["name"]: row for row in describe_backends()}
    assert set(BUILTINS) <= set(rows)
    for name in ("cpu", "sim"):
        assert rows[name] == {"name": name, "available": True, "reason": ""}
    for name in ("cuda", "npu"):
        if not rows[name]["available"]:
            assert rows[name]["reason"], f"{name} is unavailable without saying why"


def test_cuda_and_npu_say_why_they_are_unavailable():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    ok, reason = get_backend("cuda").is_available()
    assert not ok and "CUDA" in reason
    with pytest.raises(MegahetError, match="backend 'cuda' is not available here: .*CUDA"):
        get_backend("cuda").require_available()
    ok, reason = get_backend("npu").is_available()
    if ok:
        pytest.skip("an Ascend NPU is available here")
    assert reason.startswith("torch_npu")
    assert default_backend_name() == "cpu"


def test_register_backend_at_run_time(clean_registry):
    class ToyBackend(Backend):
        name = "toy"
        domain = "toy"

        def __init__(self, flavour: str = "plain", *, peak_tflops=None):
            super().__init__(peak_tflops=peak_tflops)
            self.flavour = flavour

        def build_kernels(self) -> Kernels:
            return Kernels.reference().replace(swiglu=torch.mul)

    register_backend("toy", ToyBackend)
    assert "toy" in registered_backends()
    toy = get_backend("toy", flavour="spicy")
    assert isinstance(toy, ToyBackend) and toy.flavour == "spicy"
    assert toy.kernels.swiglu is torch.mul and toy.kernels is toy.kernels  # built once
    assert {"name": "toy", "available": True, "reason": ""} in describe_backends()
    with pytest.raises(MegahetError, match="no option.* colour"):
        get_backend("toy", colour="red")


def test_register_backend_rejects_bad_input(clean_registry):
    with pytest.raises(MegahetError, match="subclass of megahet.device.Backend"):
        register_backend("toy", object)
    with pytest.raises(MegahetError, match="must be a Python identifier"):
        register_backend("my gpu", Backend)


def test_importing_backends_touches_no_vendor_runtime():
    code = textwrap.dedent("""
        import sys, torch
        import megahet.device as d
        import megahet.backends.cuda, megahet.backends.npu
        d.describe_backends()
        d.get_backend("npu").is_available()
        assert "torch_npu" not in sys.modules, "torch_npu was imported"
        assert "flash_attn" not in sys.modules and "apex" not in sys.modules
        assert not torch.cuda.is_initialized(), "CUDA was initialised"
        print("clean")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "clean" in result.stdout


# -- CPU behaviour --------------------------------------------------------------------------------
def test_cpu_device_is_plain_cpu():
    backend = get_backend("cpu")
    assert backend.device(3) == torch.device("cpu")
    assert torch.zeros(1, device=backend.device(0)).device == backend.device(0)


def test_rng_seed_and_state_round_trip():
    backend = get_backend("cpu")
    backend.manual_seed(123)
    first = torch.randn(4)
    backend.manual_seed(123)
    torch.testing.assert_close(torch.randn(4), first)
    state = backend.get_rng_state()
    assert state.dtype == torch.uint8
    expected = torch.randn(4)
    backend.set_rng_state(state)
    torch.testing.assert_close(torch.randn(4), expected)


def test_memory_stats_see_a_large_allocation():
    backend = get_backend("cpu")
    backend.reset_peak_memory()
    before = backend.memory_stats()
    assert set(before) == {"allocated_gb", "peak_gb"}
    assert 0 < before["allocated_gb"] <= before["peak_gb"]
    block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, written so the pages are resident
    after = backend.memory_stats()
    assert after["peak_gb"] >= before["allocated_gb"] + 0.05
    del block


def test_peak_flops_option_and_validation(fixed_measurement):
    assert get_backend("cpu").peak_flops(torch.bfloat16) == 1e11
    assert get_backend("cpu", peak_tflops=2.5).peak_flops(torch.float32) == 2.5e12
    with pytest.raises(MegahetError, match="floating torch dtype"):
        get_backend("cpu").peak_flops(torch.int64)
    for bad in (0, -1.0, "fast", True):
        with pytest.raises(MegahetError, match="peak_tflops"):
            get_backend("cpu", peak_tflops=bad)


def test_measured_peak_flops_is_positive_and_cached():
    backend = get_backend("cpu")
    first = backend.peak_flops(torch.float32)
    assert first > 1e8  # any CPU does more than 0.1 GFLOP/s
    assert backend.peak_flops(torch.float32) == first
    assert get_backend("sim", speed=0.5).peak_flops(torch.float32) == pytest.approx(first / 2)


# -- sim ------------------------------------------------------------------------------------------
def test_sim_defaults_and_options():
    sim = get_backend("sim")
    assert (sim.speed, sim.domain) == (1.0, "sim")
    other = get_backend("sim", speed=0.25, domain="sim_b")
    assert (other.speed, other.domain) == (0.25, "sim_b")


@pytest.mark.parametrize("speed", [0, -0.5, 1.5, True, "slow", None])
def test_sim_rejects_bad_speed(speed):
    with pytest.raises(MegahetError, match="speed"):
        get_backend("sim", speed=speed)


def test_sim_rejects_empty_domain():
    with pytest.raises(MegahetError, match="domain"):
        get_backend("sim", domain="")


@pytest.mark.parametrize("speed, elapsed, expected", [(0.25, 0.1, 0.3), (0.5, 2.0, 2.0),
                                                      (1.0, 5.0, None)])
def test_sim_after_compute_slows_by_the_speed_factor(monkeypatch, speed, elapsed, expected):
    sleeps = []
    monkeypatch.setattr(sim_mod.time, "sleep", sleeps.append)
    get_backend("sim", speed=speed).after_compute(elapsed)
    if expected is None:
        assert sleeps == []
    else:
        assert sleeps == [pytest.approx(expected)]
    with pytest.raises(MegahetError, match="negative"):
        get_backend("sim", speed=speed).after_compute(-1.0)


def test_non_sim_after_compute_does_nothing(monkeypatch):
    sleeps = []
    monkeypatch.setattr(sim_mod.time, "sleep", sleeps.append)
    get_backend("cpu").after_compute(3.0)
    assert sleeps == []


def test_sim_peak_flops_scales_with_speed(fixed_measurement):
    assert get_backend("sim", speed=0.25).peak_flops(torch.bfloat16) == pytest.approx(0.25e11)
    # An explicit peak describes the simulated device itself, so it is not scaled again.
    assert get_backend("sim", speed=0.25, peak_tflops=1.0).peak_flops(torch.bfloat16) == 1e12


# -- vendor datasheet tables (pure functions, testable without the hardware) ---------------------
def test_cuda_peak_table_tf32():
    from megahet.backends.cuda import lookup_peak_flops
    assert lookup_peak_flops("NVIDIA A100-SXM4-80GB", torch.float32, tf32=True) == 156e12
    assert lookup_peak_flops("NVIDIA H100 80GB HBM3", torch.float32, tf32=True) == 494e12
    assert lookup_peak_flops("NVIDIA H100 80GB HBM3", torch.float32) == 67e12
    assert lookup_peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16, tf32=True) == 989e12


@pytest.mark.parametrize("name, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),
    ("NVIDIA H100 PCIe", torch.float16, 756e12),
    ("NVIDIA H200", torch.bfloat16, 989e12),
    ("NVIDIA H20", torch.bfloat16, 148e12),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
    ("NVIDIA A100-SXM4-80GB", torch.float32, 19.5e12),  # TF32 off (PyTorch's default): plain fp32 peak
    ("NVIDIA A10", torch.bfloat16, 125e12),
    ("NVIDIA A100-SXM4-80GB", torch.float64, None),
    ("NVIDIA GeForce RTX 3090", torch.bfloat16, None),
])
def test_cuda_peak_table(name, dtype, expected):
    assert cuda_mod.lookup_peak_flops(name, dtype) == expected


@pytest.mark.parametrize("name, dtype, expected", [
    ("Ascend910B3", torch.bfloat16, 313e12),
    ("Ascend910B1", torch.float16, 414e12),
    ("Ascend910A", torch.bfloat16, None),
    ("Ascend910", torch.float16, 256e12),
    ("Ascend910_9391", torch.bfloat16, None),
])
def test_npu_peak_table(name, dtype, expected):
    assert npu_mod.lookup_peak_flops(name, dtype) == expected
