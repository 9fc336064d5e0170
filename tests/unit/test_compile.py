"""--compile gives the losses of the eager model (tracing checked with the quick aot_eager backend)."""
import pytest
import torch

from megahet.compile import compile_layers, compile_supported
from megahet.config import build_config
from megahet.parallel.context import single_process_context
from megahet.training.loss_scaler import build_loss_scaler
from megahet.training.model_builder import build_model_chunks, build_moe_tracker
from megahet.training.optimizer_setup import build_optimizer
from megahet.training.train_step import train_step

VOCAB = 64


def _losses(compiled: bool, steps=2, **over):
    torch._dynamo.reset()
    cfg = build_config(overrides=dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=8,
                                      vocab_size=VOCAB, make_vocab_size_divisible_by=1, mock_data=True,
                                      train_iters=1, micro_batch_size=2, global_batch_size=4, lr=1e-2, **over))
    ctx = single_process_context("cpu")
    tracker = build_moe_tracker(cfg)
    chunks = build_model_chunks(cfg, ctx, VOCAB, VOCAB, tracker)
    if compiled:
        assert compile_layers(chunks, ctx.device, backend="aot_eager") == 2
    scaler = build_loss_scaler(False)
    ddp, opt = build_optimizer(cfg, ctx, chunks, scaler)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        t = torch.randint(0, VOCAB, (4, 9), generator=g)
        mbs = [{"tokens": t[i:i + 2, :-1], "labels": t[i:i + 2, 1:], "loss_mask": torch.ones(2, 8)} for i in (0, 2)]
        out.append(train_step(chunks, ddp, opt, ctx, mbs, schedule="afab", loss_scaler=scaler,
                              moe_tracker=tracker).loss)
    return out


@pytest.mark.parametrize("over", [{}, {"recompute_granularity": "full"}, {"recompute_granularity": "selective"},
                                  {"num_experts": 4, "moe_router_topk": 2}], ids=["plain", "full", "selective", "moe"])
def test_compiled_layers_give_the_eager_losses(over):
    eager, compiled = _losses(False, **over), _losses(True, **over)
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-5, atol=1e-6)
    assert eager[1] != eager[0]  # the step updated the weights


def test_compile_is_refused_where_inductor_cannot_generate_code():
    assert not compile_supported(torch.device("meta"))[0]
