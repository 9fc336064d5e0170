"""--compile under tensor and sequence parallelism: the collectives between graphs stay exact."""
import torch

from megahet.testing import run_distributed
from tests.distributed.compile_cases import compiled_losses


def test_compiled_layers_under_tp_and_sp_give_the_eager_losses():
    over = {"sequence_parallel": True, "recompute_granularity": "full"}
    eager = run_distributed(compiled_losses, 2, False, 2, over, timeout=240)[0]
    compiled = run_distributed(compiled_losses, 2, True, 2, over, timeout=240)[0]
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-5, atol=1e-6)
