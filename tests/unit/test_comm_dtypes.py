"""Reductions in dtypes a native library lacks (hccl has no fp64) are staged in one it has.

The backend declares what its library cannot reduce; native groups built for it honour that."""
import torch

from backends.npu import NPUBackend
from megahet.device import get_backend
from megahet.parallel.comm import CommGroup


def test_backends_declare_what_their_library_cannot_reduce():
    assert NPUBackend.unreducible_dtypes == frozenset({torch.float64})  # hccl: no fp64 reductions
    assert get_backend("cpu").unreducible_dtypes == frozenset()


def test_group_stages_unreducible_dtypes_in_fp32_and_keeps_the_rest():
    x = torch.tensor([1.5, 2.25], dtype=torch.float64)  # [2]
    hccl = CommGroup([0, 1], 0, pg=None, library="hccl", device=torch.device("cpu"),
                     unreducible_dtypes=NPUBackend.unreducible_dtypes)
    staged = hccl._stage_reduction(x)
    assert staged.dtype == torch.float32 and staged is not x and staged.tolist() == [1.5, 2.25]
    for dtype in (torch.float32, torch.int64, torch.int32):
        y = torch.ones(2, dtype=dtype)  # [2]
        assert hccl._stage_reduction(y) is y
    gloo = CommGroup([0, 1], 0, pg=None, library="gloo", device=torch.device("cpu"))
    assert gloo._stage_reduction(x) is x
    bridged = CommGroup([0, 1], 0, pg=None, bridged=True, device=torch.device("cpu"),
                        unreducible_dtypes=NPUBackend.unreducible_dtypes)
    assert bridged._stage_reduction(x) is x  # host-staged gloo reduces fp64
