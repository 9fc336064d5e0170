"""Reductions in dtypes a native library lacks (hccl has no fp64) are staged in one it has."""
import torch

from megahet.parallel.comm import CommGroup, reduction_dtype


def test_hccl_reduces_fp64_in_fp32_and_others_keep_their_dtype():
    assert reduction_dtype("hccl", torch.float64) == torch.float32
    for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.int32):
        assert reduction_dtype("hccl", dtype) == dtype
    for library in ("gloo", "nccl"):
        assert reduction_dtype(library, torch.float64) == torch.float64


def test_group_stages_fp64_for_hccl_only():
    x = torch.tensor([1.5, 2.25], dtype=torch.float64)  # [2]
    hccl = CommGroup([0, 1], 0, pg=None, library="hccl", device=torch.device("cpu"))
    staged = hccl._stage_reduction(x)
    assert staged.dtype == torch.float32 and staged is not x and staged.tolist() == [1.5, 2.25]
    gloo = CommGroup([0, 1], 0, pg=None, library="gloo", device=torch.device("cpu"))
    assert gloo._stage_reduction(x) is x
