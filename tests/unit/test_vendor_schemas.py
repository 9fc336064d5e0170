"""megahet's vendor calls checked against the signatures the vendor packages declare.

No vendor runtime is installed or imported: stand-in modules bind every call against the schema in
tests/data/vendor_schemas.json (copied from torch_npu's op-plugin yaml, flash-attn's and apex's
Python sources) and return zeros of the documented output shape. Numerics are the GPU/NPU suites'
job; what is checked here is that each call would be accepted by the installed package.
"""
import sys
import types

import pytest
import torch

from megahet.backends import npu as npu_backend
from megahet.backends.cuda import make_causal_attention, make_rms_norm
from tests.vendor_schema import SCHEMAS, SchemaMismatch, npu_schema, py_signature

BF16 = torch.bfloat16


def _fake_torch_npu(grouped_form: str) -> types.ModuleType:
    fake = types.ModuleType("torch_npu")
    fake.calls = []

    def npu_rms_norm(*args, **kwargs):
        b = npu_schema("npu_rms_norm").bind(*args, **kwargs)
        fake.calls.append("npu_rms_norm")
        return torch.zeros_like(b["self"]), torch.zeros(1)

    def npu_rotary_mul(*args, **kwargs):
        b = npu_schema("npu_rotary_mul").bind(*args, **kwargs)
        fake.calls.append("npu_rotary_mul")
        return torch.zeros_like(b["self"])

    def npu_fusion_attention(*args, **kwargs):
        b = npu_schema("npu_fusion_attention").bind(*args, **kwargs)
        fake.calls.append("npu_fusion_attention")
        assert b["input_layout"] == "BSND" and b["sparse_mode"] == 2 and b["atten_mask"].shape == (2048, 2048)
        return torch.zeros_like(b["query"]), None, None, None, 0, 0, 0

    def npu_grouped_matmul(*args, **kwargs):
        b = npu_schema("npu_grouped_matmul", grouped_form).bind(*args, **kwargs)
        fake.calls.append("npu_grouped_matmul")
        x, w = b["x"][0], b["weight"]
        return [torch.zeros(x.shape[0], w[0].shape[1], dtype=x.dtype)]  # split_item=2: one [T, n] output

    for fn in (npu_rms_norm, npu_rotary_mul, npu_fusion_attention, npu_grouped_matmul):
        setattr(fake, fn.__name__, fn)
    return fake


@pytest.fixture(params=["tensor", "ints"])
def fake_npu(request, monkeypatch):
    fake = _fake_torch_npu(request.param)
    fake.form = request.param
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    return fake


def test_grouped_matmul_form_read_from_the_schema():
    ops = SCHEMAS["torch_npu"]["npu_grouped_matmul"]
    assert npu_backend.grouped_matmul_form(ops["tensor"]["schema"]) == "tensor"
    assert npu_backend.grouped_matmul_form(ops["ints"]["schema"]) == "ints"
    # An int list without group_type, but also a tensor group_list without group_list_type: neither form.
    assert npu_backend.grouped_matmul_form("npu_grouped_matmul(Tensor[] x, Tensor[] weight, *, "
                                           "Tensor? group_list=None, int? group_type=None) -> Tensor[]") is None
    assert npu_backend.grouped_matmul_form("garbage") is None


def test_grouped_matmul_calls_match_the_installed_schema(fake_npu):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 16, generator=gen).to(BF16).requires_grad_()      # [T, k]
    w = torch.randn(3, 16, 8, generator=gen).to(BF16).requires_grad_()   # [E, k, n]
    y = npu_backend.make_grouped_matmul(fake_npu.form)(x, w, [2, 0, 5])
    assert y.shape == (7, 8)
    y.float().sum().backward()
    assert fake_npu.calls == ["npu_grouped_matmul"] * 2  # forward, and backward's input gradient
    assert w.grad.shape == w.shape


def test_a_call_in_the_other_form_is_rejected():
    x, w = torch.zeros(4, 2, dtype=BF16), [torch.zeros(2, 3, dtype=BF16)] * 2
    for installed, called in (("ints", "tensor"), ("tensor", "ints")):
        sys.modules["torch_npu"] = _fake_torch_npu(installed)
        try:
            with pytest.raises(SchemaMismatch, match="group_type|group_list"):
                npu_backend._call_grouped_matmul(called, x, w, [1, 4])
        finally:
            del sys.modules["torch_npu"]


def test_other_npu_kernels_match_their_schemas(fake_npu):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 64, generator=gen).to(BF16)
    npu_backend.npu_rms_norm(x, torch.ones(64, dtype=BF16), 1e-5)
    q = torch.randn(4, 2, 3, 128, generator=gen).to(BF16)                   # [s, b, n, d]
    cos, sin = torch.ones(4, 1, 1, 128), torch.zeros(4, 1, 1, 128)
    npu_backend.npu_apply_rotary(q, cos, sin)
    qa = torch.randn(2, 6, 4, 64, generator=gen).to(BF16)                    # [b, s, nq, d]
    kv = torch.randn(2, 6, 2, 64, generator=gen).to(BF16)                    # GQA: [b, s, nkv, d]
    assert npu_backend.npu_causal_attention(qa, kv, kv).shape == qa.shape
    assert fake_npu.calls == ["npu_rms_norm", "npu_rotary_mul", "npu_fusion_attention"]


def _recording(sig, output_like: str):
    """A stand-in for a vendor function: binds every call to `sig` (the package's declared signature,
    so a mismatch fails), records the binding, returns zeros shaped like argument `output_like`."""
    calls = []

    def fake(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        calls.append(bound)
        return torch.zeros_like(bound[output_like])

    return fake, calls


def test_flash_attn_call_matches_flash_attn_func():
    sig = py_signature("flash_attn", "flash_attn_func")
    flash_attn_func, calls = _recording(sig, "q")
    attention = make_causal_attention(flash_attn_func, on_device=lambda t: True)
    q = torch.zeros(2, 8, 4, 64, dtype=BF16)
    k = torch.zeros(2, 8, 2, 64, dtype=BF16)
    assert attention(q, k, k, 0.125).shape == q.shape
    assert calls and calls[0]["causal"] is True and calls[0]["softmax_scale"] == 0.125
    with pytest.raises(SchemaMismatch):
        sig.bind(q, k, k, is_causal=True)  # a keyword flash-attn does not have fails the check


def test_apex_call_matches_fused_rms_norm_affine():
    fused_rms_norm_affine, calls = _recording(py_signature("apex", "fused_rms_norm_affine"), "input")
    rms = make_rms_norm(fused_rms_norm_affine, on_device=lambda t: True)
    x = torch.zeros(3, 32, dtype=BF16)
    rms(x, torch.ones(32, dtype=BF16), 1e-6)
    assert calls and tuple(calls[0]["normalized_shape"]) == (32,) and calls[0]["eps"] == 1e-6
