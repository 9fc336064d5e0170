"""Step-speed paths give the results of the plain ones: gradient-accumulation fusion, fp32 params as
their own masters, the optimizer implementations, and the skip decided from the gradient norm."""
import math

import pytest
import torch

from megahet.config import build_config
from megahet.errors import MegahetError
from megahet.parallel.context import single_process_context
from megahet.parallel.data_parallel import DataParallel
from megahet.training import optimizer as optimizer_module
from megahet.training.loss_scaler import build_loss_scaler
from megahet.training.model_builder import build_model_chunks
from megahet.training.grad_norm import found_inf as optimizer_module_found_inf
from megahet.training.optimizer import MixedPrecisionOptimizer, optimizer_flags
from megahet.training.optimizer_setup import build_optimizer

VOCAB = 64


def _model(bf16=False, tied=True, fusion=True, impl="auto", **over):
    cfg = build_config(overrides=dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=8,
                                      vocab_size=VOCAB, make_vocab_size_divisible_by=1, mock_data=True,
                                      train_iters=1, micro_batch_size=2, global_batch_size=2, bf16=bf16,
                                      untie_embeddings_and_output_weights=not tied, lr=1e-2,
                                      gradient_accumulation_fusion=fusion, optimizer_implementation=impl, **over))
    ctx = single_process_context("cpu")
    chunks = build_model_chunks(cfg, ctx, VOCAB, VOCAB)
    ddp, opt = build_optimizer(cfg, ctx, chunks, build_loss_scaler(False))
    return chunks[0], ddp, opt


def _batch(seed, b=2, s=8):
    t = torch.randint(0, VOCAB, (b, s + 1), generator=torch.Generator().manual_seed(seed))
    t[:, :4] = 5  # repeated tokens: several rows of the embedding gradient add up
    return t[:, :-1], t[:, 1:]


def _grads(model, ddp, micro_batches, poison=False):
    ddp.start_grad_accumulation()
    if poison:  # the buffers are not zeroed: last step's values must be overwritten, not added to
        for b in ddp.buffers:
            b.data.fill_(float("nan"))
    for seed in micro_batches:
        tokens, labels = _batch(seed)
        model(tokens=tokens, labels=labels).sum().backward()
    ddp.finish_grad_sync()
    assert all(p.grad is None for p in ddp.params)
    return {p.global_name: p.main_grad.clone() for p in ddp.params}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("bf16", [False, True])
def test_fused_weight_gradients_match_the_hook_path(tied, bf16):
    fused, fused_ddp, _ = _model(bf16, tied, fusion=True)
    plain, plain_ddp, _ = _model(bf16, tied, fusion=False)
    assert fused.output_layer.weight is None if tied else True
    # One micro-batch: the same kernels write the same bits (first writes overwrite the buffer).
    one_f, one_p = _grads(fused, fused_ddp, [1], poison=True), _grads(plain, plain_ddp, [1])
    for name in one_p:
        assert torch.equal(one_f[name], one_p[name]), name
    # Several: later micro-batches accumulate (addmm_ in fp32: the same sum, another rounding order).
    many_f, many_p = _grads(fused, fused_ddp, [2, 3, 4], poison=True), _grads(plain, plain_ddp, [2, 3, 4])
    for name in many_p:
        torch.testing.assert_close(many_f[name], many_p[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(many_f["decoder.layers.0.mlp.linear_fc1.weight"], one_f["decoder.layers.0.mlp.linear_fc1.weight"])


def test_a_param_without_gradient_is_zeroed_not_left_stale():
    model, ddp, _ = _model()
    _grads(model, ddp, [1])
    norm = model.decoder.final_layernorm.weight
    norm.requires_grad_(False)  # autograd skips it: no write this step
    try:
        grads = _grads(model, ddp, [2])
    finally:
        norm.requires_grad_(True)
    assert float(grads["decoder.final_layernorm.weight"].abs().sum()) == 0.0


def test_zero_grad_still_zeroes_and_fusion_accumulates_onto_it():
    model, ddp, _ = _model()
    _grads(model, ddp, [1])
    ddp.zero_grad()
    assert all(float(b.data.abs().sum()) == 0.0 for b in ddp.buffers)
    tokens, labels = _batch(1)
    model(tokens=tokens, labels=labels).sum().backward()
    ddp.finish_grad_sync()
    want = _grads(model, ddp, [1])
    torch.testing.assert_close(model.decoder.layers["0"].mlp.linear_fc1.weight.main_grad,
                               want["decoder.layers.0.mlp.linear_fc1.weight"])


def test_fp32_params_are_their_own_masters_and_bf16_params_are_not():
    model, _, opt = _model()
    assert all(pc.aliased and pc.master.data_ptr() == pc.param.data_ptr() for pc in opt.pieces)
    model16, _, opt16 = _model(bf16=True)
    assert not any(pc.aliased for pc in opt16.pieces)
    assert all(pc.master.dtype == torch.float32 for pc in opt16.pieces)


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_optimizer_implementations_agree_with_the_loop(impl):
    ref, ref_ddp, ref_opt = _model(impl="for-loop")
    got, got_ddp, got_opt = _model(impl=impl)
    assert got_opt.flags[impl] and not ref_opt.flags["fused"] and not ref_opt.flags["foreach"]
    for step in range(3):
        for model, ddp, opt in ((ref, ref_ddp, ref_opt), (got, got_ddp, got_opt)):
            _grads(model, ddp, [step])
            assert opt.step().ok
    for (name, p), q in zip(ref.named_parameters(), got.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    state = got_opt.state_by_name()  # fused keeps its step count on the device; checkpoints read it alike
    assert float(state["decoder.final_layernorm.weight"]["step"]) == 3.0


def test_auto_picks_the_fused_kernel_on_cpu_and_bad_names_fail():
    assert optimizer_flags("auto", torch.device("cpu")) == {"fused": True, "foreach": False}
    with pytest.raises(MegahetError, match="--optimizer-implementation"):
        optimizer_flags("apex", torch.device("cpu"))
    with pytest.raises(MegahetError, match="--optimizer-implementation"):
        build_config(overrides={"optimizer_implementation": "apex"})


def test_without_loss_scaling_the_norm_decides_the_skip(monkeypatch):
    def no_second_pass(*a, **k):
        raise AssertionError("found_inf ran a pass over the gradients")
    monkeypatch.setattr(optimizer_module, "found_inf", no_second_pass)
    model, ddp, opt = _model()
    _grads(model, ddp, [1])
    assert opt.step().ok
    before = [p.detach().clone() for p in model.parameters()]
    _grads(model, ddp, [2])
    model.decoder.layers["1"].mlp.linear_fc2.weight.main_grad[0, 0] = float("nan")
    result = opt.step()
    assert not result.ok and result.found_inf and math.isnan(result.grad_norm) and opt.num_steps == 1
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_a_loss_scaler_still_checks_every_tensor(monkeypatch):
    calls = []
    monkeypatch.setattr(optimizer_module, "found_inf", lambda *a: calls.append(1) or optimizer_module_found_inf(*a))
    ctx = single_process_context("cpu")
    lin = torch.nn.Linear(3, 2)
    for n, p in lin.named_parameters():
        p.global_name = n
    ddp = DataParallel([lin], ctx)
    scaler = build_loss_scaler(True, initial_scale=4.0, hysteresis=1)
    opt = MixedPrecisionOptimizer([lin], ddp, ctx, lr=0.1, params_dtype=torch.float16, loss_scaler=scaler)
    ddp.start_grad_accumulation()
    lin(torch.ones(1, 3)).sum().backward()
    ddp.finish_grad_sync()
    lin.weight.main_grad[0, 0] = float("inf")
    assert not opt.step().ok and scaler.scale == 2.0 and calls == [1]
