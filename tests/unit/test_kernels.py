"""Every kernel of every registered backend against the reference: outputs and gradients.

Backends come from the entry points, so an installed vendor plugin is tested too; backends that cannot
run here are skipped with their own reason. The references themselves are checked against independent
formulas, and the NPU wrappers are exercised against a stand-in torch_npu that implements the
documented semantics of the ops they call.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from megahet.device import get_backend, registered_backends
from megahet.errors import MegahetError
from megahet.kernels import KERNEL_NAMES, Kernels, reference_causal_attention, rotate_half

TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16"}


@pytest.fixture(params=registered_backends())
def backend(request):
    built = get_backend(request.param)
    ok, reason = built.is_available()
    if not ok:
        pytest.skip(f"backend {request.param} unavailable: {reason}")
    return built


def _rotary_tables(s: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))  # [d/2]
    angles = torch.outer(torch.arange(s).float(), inv_freq)  # [s, d/2]
    angles = torch.cat((angles, angles), dim=-1)  # [s, d]
    return angles.cos()[:, None, None, :], angles.sin()[:, None, None, :]  # [s, 1, 1, d] each


def _cases() -> dict[str, tuple[str, callable]]:
    """name -> (kernel, builder(gen) -> list of args; float tensors get differentiated)."""
    def rms(gen):
        return [torch.randn(5, 3, 64, generator=gen), torch.rand(64, generator=gen) + 0.5, 1e-5]

    def layer(gen):
        return [torch.randn(5, 3, 64, generator=gen) * 2 + 1, torch.rand(64, generator=gen) + 0.5,
                torch.randn(64, generator=gen), 1e-5]

    def rotary(gen):
        cos, sin = _rotary_tables(6, 32)
        return [torch.randn(6, 2, 3, 32, generator=gen), cos, sin]

    def attention(nq, nkv):
        def build(gen):
            return [torch.randn(2, 7, nq, 16, generator=gen), torch.randn(2, 7, nkv, 16, generator=gen),
                    torch.randn(2, 7, nkv, 16, generator=gen), 0.3]
        return build

    def attention_strided(gen):  # [b, s] views of [s, b] activations, as the model passes them
        q, k, v = (torch.randn(7, 2, n, 16, generator=gen).transpose(0, 1) for n in (4, 2, 2))
        return [q, k, v, None]

    def swiglu(gen):
        return [torch.randn(4, 3, 40, generator=gen), torch.randn(4, 3, 40, generator=gen)]

    def grouped(k, n):
        def build(gen):  # experts 1 and 3 receive no tokens
            return [torch.randn(11, k, generator=gen), torch.randn(4, k, n, generator=gen) / k ** 0.5,
                    [6, 0, 5, 0]]
        return build

    return {
        "rms_norm": ("rms_norm", rms),
        "layer_norm": ("layer_norm", layer),
        "apply_rotary": ("apply_rotary", rotary),
        "attention_gqa": ("causal_attention", attention(4, 2)),
        "attention_mha": ("causal_attention", attention(4, 4)),
        "attention_strided": ("causal_attention", attention_strided),
        "swiglu": ("swiglu", swiglu),
        "grouped_matmul_aligned": ("grouped_matmul", grouped(32, 16)),
        "grouped_matmul_unaligned": ("grouped_matmul", grouped(7, 5)),
    }


CASES = _cases()


def _prepare(args, device, dtype):
    """Cast float tensors to dtype (rotary tables stay fp32) and mark the differentiable ones."""
    out, leaves = [], []
    for i, arg in enumerate(args):
        if isinstance(arg, torch.Tensor) and arg.is_floating_point():
            keep_fp32 = arg.dim() == 4 and arg.shape[1:3] == (1, 1)  # cos/sin [s, 1, 1, d]
            t = arg.to(device=device, dtype=torch.float32 if keep_fp32 else dtype)
            if not keep_fp32:
                t.requires_grad_(True)
                leaves.append(t)
            out.append(t)
        else:
            out.append(arg)
    return out, leaves


def _run(fn, args, device, dtype):
    prepared, leaves = _prepare(args, device, dtype)
    y = fn(*prepared)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(device, dtype)
    grads = torch.autograd.grad(y, leaves, upstream)
    return y.detach(), [g.detach() for g in grads]


def _assert_close(actual, expected, dtype, what):
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), **TOLERANCE[dtype],
                               msg=lambda m: f"{what}: {m}")


def _check_against_reference(kernels: Kernels, case: str, device, dtype) -> None:
    name, build = CASES[case]
    _check_kernel(kernels, case, name, build, device, dtype)


def _check_kernel(kernels: Kernels, case: str, name: str, build, device, dtype) -> None:
    args = build(torch.Generator().manual_seed(0))
    y, grads = _run(getattr(kernels, name), args, device, dtype)
    y_ref, grads_ref = _run(getattr(Kernels.reference(), name), args, device, dtype)
    assert y.shape == y_ref.shape
    _assert_close(y, y_ref, dtype, f"{case} output")
    assert len(grads) == len(grads_ref) > 0
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        _assert_close(g, g_ref, dtype, f"{case} grad of input {i}")


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", list(CASES))
def test_backend_kernel_matches_reference(backend, case, dtype):
    _check_against_reference(backend.kernels, case, backend.device(0), dtype)


def test_cases_cover_every_kernel():
    assert {name for name, _ in CASES.values()} == set(KERNEL_NAMES)


def test_rms_norm_mixed_dtype_matches_reference(backend):
    x = torch.randn(4, 64).to(backend.device(0), torch.bfloat16)
    w = (torch.rand(64) + 0.5).to(backend.device(0))  # fp32 weight, bf16 activations
    y = backend.kernels.rms_norm(x, w, 1e-6)
    assert y.dtype == torch.bfloat16
    _assert_close(y, Kernels.reference().rms_norm(x, w, 1e-6), torch.bfloat16, "mixed rms_norm")


# -- the references against independent formulas ---------------------------------------------------
def test_reference_norms_match_torch_in_fp64():
    ref = Kernels.reference()
    x, w, b = torch.randn(3, 5, 32, dtype=torch.float64), torch.rand(32, dtype=torch.float64), \
        torch.randn(32, dtype=torch.float64)
    rms = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * w
    torch.testing.assert_close(ref.rms_norm(x, w, 1e-6), rms)
    torch.testing.assert_close(ref.layer_norm(x, w, b, 1e-5), F.layer_norm(x, (32,), w, b, 1e-5))
    assert ref.rms_norm(x.bfloat16(), w.float(), 1e-6).dtype == torch.bfloat16


def test_reference_rotary_is_a_rotation():
    cos, sin = _rotary_tables(5, 16)
    x = torch.randn(5, 2, 3, 16)
    y = Kernels.reference().apply_rotary(x, cos, sin)
    torch.testing.assert_close(y[0], x[0])  # position 0: angle 0 is the identity
    # Each pair (i, i + d/2) is rotated, so its norm is kept.
    pair_norm = lambda t: t[..., :8].pow(2) + t[..., 8:].pow(2)  # noqa: E731
    torch.testing.assert_close(pair_norm(y), pair_norm(x))
    torch.testing.assert_close(rotate_half(torch.arange(4.0)), torch.tensor([-2.0, -3.0, 0.0, 1.0]))


def test_reference_attention_matches_sdpa_in_fp64():
    q, k, v = (torch.randn(2, 6, n, 8, dtype=torch.float64) for n in (6, 2, 2))
    out = reference_causal_attention(q, k, v, 0.5).transpose(1, 2)  # [b, nq, s, d]
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(3, 2).transpose(1, 2),
        v.repeat_interleave(3, 2).transpose(1, 2), is_causal=True, scale=0.5)
    torch.testing.assert_close(out, expected)
    # The first token attends only to itself.
    torch.testing.assert_close(out[:, :, 0], v.repeat_interleave(3, 2)[:, 0])


def test_reference_grouped_matmul_matches_per_row_weights():
    x, w = torch.randn(9, 6), torch.randn(3, 6, 4)
    counts = [2, 0, 7]
    owner = torch.tensor([0, 0, 2, 2, 2, 2, 2, 2, 2])
    expected = torch.einsum("tk,tkn->tn", x, w[owner])
    torch.testing.assert_close(Kernels.reference().grouped_matmul(x, w, counts), expected)
    torch.testing.assert_close(Kernels.reference().grouped_matmul(x, w, torch.tensor(counts)), expected)


def test_reference_swiglu():
    gate, up = torch.randn(10), torch.randn(10)
    torch.testing.assert_close(Kernels.reference().swiglu(gate, up), gate * torch.sigmoid(gate) * up)


# -- bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("counts, message", [([3, 3], "2 token counts for 3 experts"),
                                             ([3, 3, 3], "sum to the 8 rows"),
                                             ([9, -1, 0], "non-negative")])
def test_grouped_matmul_rejects_bad_counts(counts, message):
    with pytest.raises(MegahetError, match=message):
        Kernels.reference().grouped_matmul(torch.randn(8, 4), torch.randn(3, 4, 2), counts)


def test_attention_rejects_heads_that_do_not_group():
    q, kv = torch.randn(1, 4, 6, 8), torch.randn(1, 4, 4, 8)
    with pytest.raises(MegahetError, match="6 query heads are not a multiple of 4 kv heads"):
        Kernels.reference().causal_attention(q, kv, kv, None)


def test_replace_returns_new_table_and_rejects_unknown_names():
    base = Kernels.reference()
    swapped = base.replace(swiglu=torch.mul)
    assert swapped.swiglu is torch.mul and base.swiglu is not torch.mul
    assert swapped.rms_norm is base.rms_norm
    assert "torch" in swapped.describe()["swiglu"]
    with pytest.raises(MegahetError, match="unknown kernel.*flash"):
        base.replace(flash=torch.mul)
    with pytest.raises(MegahetError, match="not callable"):
        base.replace(swiglu=3)


# NPU (and flash-attn / apex) calls are checked against the vendors' declared signatures in
# tests/unit/test_vendor_schemas.py.
