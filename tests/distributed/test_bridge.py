"""Groups that span communication domains go through the host bridge and stay exact."""
import pytest
import torch

from megahet.testing import DistributedTestError, run_distributed
from tests.distributed.bridge_cases import bridged_collectives, tp_across_domains


def test_cross_domain_group_is_bridged_and_exact():
    r0, r1 = run_distributed(bridged_collectives, 2, timeout=60)
    assert r0["bridged"] and r0["world_bridged"] and r0["backend"] == "cpu" and r1["backend"] == "sim"
    expected = (torch.tensor(1.0, dtype=torch.bfloat16).float() + torch.tensor(1 + 1 / 256, dtype=torch.bfloat16).float())
    assert r0["dtype"] == "torch.bfloat16"  # written back into the caller's tensor, same dtype
    torch.testing.assert_close(r0["sum_bf16"].float(), expected.expand(4).to(torch.bfloat16).float())
    torch.testing.assert_close(r0["gather"], torch.tensor([0., 1, 2, 3, 10, 11, 12, 13]))
    torch.testing.assert_close(r0["rs"], torch.tensor([0., 3.]))
    torch.testing.assert_close(r1["rs"], torch.tensor([6., 9.]))


def test_tensor_parallel_may_not_span_domains():
    with pytest.raises(DistributedTestError, match="tensor-parallel group .* spans communication domains"):
        run_distributed(tp_across_domains, 2, timeout=60)
