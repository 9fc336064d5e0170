"""Grad-norm counting rules, clipping, and the optimizer / data-parallel buffers on one process."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from megahet.errors import MegahetError
from megahet.parallel.comm import CommGroup
from megahet.parallel.context import single_process_context
from megahet.parallel.data_parallel import DataParallel
from megahet.training.grad_norm import clip_grads, counted_here, found_inf, global_grad_norm
from megahet.training.loss_scaler import ConstantLossScaler, DynamicLossScaler
from megahet.training.lr_schedule import LRScheduler
from megahet.training.optimizer import MixedPrecisionOptimizer, no_weight_decay


def fake_ctx(tp_rank=0, dp_rank=0, expert_dp_rank=0, pp_rank=0):
    return SimpleNamespace(tp_rank=tp_rank, dp_rank=dp_rank, expert_dp_rank=expert_dp_rank, pp_rank=pp_rank,
                           world_group=CommGroup([0], 0, name="world"))


def flagged(shape=(2, 3), **flags):
    p = nn.Parameter(torch.zeros(shape))
    for k, v in flags.items():
        setattr(p, k, v)
    return p


# ---------------------------------------------------------------------- counting rules
def test_replicated_over_tp_counts_on_tp_rank0_only():
    replicated, sharded = flagged(tp_dim=None), flagged(tp_dim=0)
    sp_norm = flagged((4,), tp_dim=None, sequence_parallel=True)  # summed over TP before: one copy counts
    assert counted_here(replicated, fake_ctx(tp_rank=0)) and not counted_here(replicated, fake_ctx(tp_rank=1))
    assert counted_here(sp_norm, fake_ctx(tp_rank=0)) and not counted_here(sp_norm, fake_ctx(tp_rank=1))
    assert counted_here(sharded, fake_ctx(tp_rank=1))


def test_data_parallel_copies_count_once_unless_sharded():
    dense, expert = flagged(tp_dim=0), flagged(tp_dim=0, is_expert=True, ep_dim=0)
    assert counted_here(dense, fake_ctx(dp_rank=0)) and not counted_here(dense, fake_ctx(dp_rank=1))
    assert counted_here(dense, fake_ctx(dp_rank=1), sharded_over_dp=True)
    # Experts replicate over the expert-data-parallel group, not over dp.
    assert counted_here(expert, fake_ctx(dp_rank=1, expert_dp_rank=0))
    assert not counted_here(expert, fake_ctx(dp_rank=0, expert_dp_rank=1))
    assert counted_here(expert, fake_ctx(expert_dp_rank=1), sharded_over_dp=True)


def test_tied_embedding_counts_on_the_first_stage_only():
    emb = flagged(tp_dim=0, shared_embedding=True)
    assert counted_here(emb, fake_ctx(pp_rank=0))
    assert not counted_here(emb, fake_ctx(pp_rank=3))


def test_global_grad_norm_sums_only_counted_copies():
    a, b = flagged(tp_dim=0), flagged((4,), tp_dim=None)
    ga, gb = torch.full((2, 3), 2.0), torch.full((4,), 3.0)
    assert global_grad_norm([a, b], fake_ctx(), grads=[ga, gb]) == pytest.approx(math.sqrt(6 * 4 + 4 * 9))
    assert global_grad_norm([a, b], fake_ctx(tp_rank=1), grads=[ga, gb]) == pytest.approx(math.sqrt(24))
    a.main_grad = ga  # default grads: main_grad
    assert global_grad_norm([a], fake_ctx()) == pytest.approx(math.sqrt(24))
    with pytest.raises(ValueError):
        global_grad_norm([a, b], fake_ctx(), grads=[ga])


def test_found_inf_flags_nan_and_inf():
    assert not found_inf([torch.ones(3), None], fake_ctx())
    assert found_inf([torch.ones(3), torch.tensor([1.0, float("inf")])], fake_ctx())
    assert found_inf([torch.tensor([float("nan")])], fake_ctx())


def test_clip_grads_scales_to_max_norm():
    g1, g2 = torch.tensor([3.0, 0.0]), torch.tensor([4.0])  # norm 5
    coeff = clip_grads([g1, g2, None], 1.0, 5.0)
    assert coeff == pytest.approx(1.0 / (5.0 + 1e-6))
    assert math.hypot(float(g1.norm()), float(g2.norm())) == pytest.approx(1.0, rel=1e-5)
    g = torch.tensor([0.3])
    assert clip_grads([g], 1.0, 0.3) == 1.0 and float(g) == pytest.approx(0.3)  # under the limit
    assert clip_grads([g], 0.0, 100.0) == 1.0 and float(g) == pytest.approx(0.3)  # clipping off


# ---------------------------------------------------------------------- optimizer on one process
class Tiny(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3).to(dtype)
        self.norm = nn.Parameter(torch.ones(3, dtype=dtype))
        for n, p in self.named_parameters():
            p.global_name = n

    def forward(self, x):
        return (self.lin(x.to(self.lin.weight.dtype)) * self.norm).float().pow(2).sum()


def setup(dtype=torch.float32, scaler=None, **kw):
    ctx = single_process_context("cpu")
    model = Tiny(dtype)
    ddp = DataParallel([model], ctx, **{k: kw.pop(k) for k in ("bucket_size", "overlap_grad_reduce") if k in kw})
    opt = MixedPrecisionOptimizer([model], ddp, ctx, lr=kw.pop("lr", 0.1), weight_decay=0.5, betas=(0.9, 0.99),
                                  eps=1e-8, clip_grad=kw.pop("clip_grad", 0.0), params_dtype=dtype, loss_scaler=scaler)
    return model, ddp, opt


def backward(model, ddp, scale=1.0, seed=1):
    ddp.zero_grad()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))
    (model(x) * scale).backward()
    ddp.finish_grad_sync()


def test_step_equals_torch_adamw_with_megatron_decay_groups():
    model, ddp, opt = setup()
    ref = Tiny()
    groups = [{"params": [ref.lin.weight], "weight_decay": 0.5},
              {"params": [ref.lin.bias, ref.norm], "weight_decay": 0.0}]
    ref_opt = torch.optim.AdamW(groups, lr=0.1, betas=(0.9, 0.99), eps=1e-8)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 2]  # weight decayed; bias and norm not
    assert no_weight_decay(model.lin.bias) and no_weight_decay(model.norm) and not no_weight_decay(model.lin.weight)
    for seed in (1, 2):
        backward(model, ddp, seed=seed)
        assert model.lin.weight.grad is None  # moved into main_grad by the hook
        grads = [p.main_grad.clone() for p in (model.lin.weight, model.lin.bias, model.norm)]
        result = opt.step()
        ref_opt.zero_grad()
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))
        ref(x).backward()
        for p, g in zip((ref.lin.weight, ref.lin.bias, ref.norm), grads):
            torch.testing.assert_close(p.grad, g)
        ref_opt.step()
        assert result.ok and not result.found_inf
        assert result.grad_norm == pytest.approx(float(torch.cat([g.reshape(-1) for g in grads]).norm()), rel=1e-6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


def test_loss_scale_is_undone_and_clipping_uses_the_true_norm():
    plain_model, plain_ddp, plain = setup(clip_grad=0.1)
    scaled_model, scaled_ddp, scaled = setup(scaler=ConstantLossScaler(8.0), clip_grad=0.1)
    backward(plain_model, plain_ddp)
    backward(scaled_model, scaled_ddp, scale=8.0)
    a, b = plain.step(), scaled.step()
    assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-6) and a.grad_norm > 0.1
    for p, q in zip(plain_model.parameters(), scaled_model.parameters()):
        torch.testing.assert_close(p, q)


def test_overflow_skips_the_step_and_backs_off():
    scaler = DynamicLossScaler(initial_scale=4.0, hysteresis=1)
    model, ddp, opt = setup(scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    backward(model, ddp)
    model.lin.weight.main_grad[0, 0] = float("inf")
    result = opt.step()
    assert not result.ok and result.found_inf and math.isnan(result.grad_norm)
    assert scaler.scale == 2.0 and opt.num_steps == 0
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_bf16_params_get_fp32_masters_and_main_grads():
    model, ddp, opt = setup(dtype=torch.bfloat16)
    backward(model, ddp)
    assert model.lin.weight.main_grad.dtype == torch.float32 and model.lin.weight.dtype == torch.bfloat16
    assert all(pc.master.dtype == torch.float32 for pc in opt.pieces)
    assert opt.step().ok
    for pc in opt.pieces:
        assert torch.equal(pc.param, pc.master.to(torch.bfloat16))


def test_micro_batches_accumulate_in_main_grad():
    model, ddp, _ = setup()
    ddp.zero_grad()
    x = torch.randn(5, 4)
    model(x[:2]).backward()
    model(x[2:]).backward()
    ddp.finish_grad_sync()
    ref = Tiny()
    ref(x[:2]).backward()
    ref(x[2:]).backward()
    torch.testing.assert_close(model.lin.weight.main_grad, ref.lin.weight.grad)


def test_state_round_trip_resumes_identically():
    model, ddp, opt = setup()
    backward(model, ddp, seed=1)
    opt.step()
    state = opt.state_by_name()
    assert set(state) == {"lin.weight", "lin.bias", "norm"}
    assert set(state["lin.weight"]) == {"master", "exp_avg", "exp_avg_sq", "step"}
    assert float(state["norm"]["step"]) == 1.0 and state["lin.weight"]["exp_avg"].abs().sum() > 0
    model2, ddp2, opt2 = setup()
    opt2.load_state_by_name(state)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)  # the params follow the loaded masters
    backward(model, ddp, seed=2)
    backward(model2, ddp2, seed=2)
    opt.step()
    opt2.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    bad = {k: dict(v) for k, v in state.items()}
    bad["lin.weight"]["master"] = torch.zeros(7, 7)
    with pytest.raises(MegahetError, match="lin.weight"):
        opt2.load_state_by_name(bad)
    with pytest.raises(MegahetError, match="no optimizer state for norm"):
        opt2.load_state_by_name({k: v for k, v in state.items() if k != "norm"})


def test_reload_model_params_refreshes_masters():
    model, ddp, opt = setup()
    with torch.no_grad():
        model.lin.weight.fill_(0.25)
    opt.reload_model_params()
    backward(model, ddp)
    ddp.zero_grad()  # zero gradient: AdamW only decays, so the masters must have been refreshed
    opt.step()
    assert torch.allclose(model.lin.weight, torch.full_like(model.lin.weight, 0.25 * (1 - 0.1 * 0.5)))


def test_lr_scheduler_drives_the_param_groups():
    _, _, opt = setup()
    sched = LRScheduler(opt, max_lr=0.1, min_lr=0.0, warmup_steps=10, decay_steps=20, decay_style="linear")
    sched.step()
    assert all(g["lr"] == pytest.approx(0.01) for g in opt.param_groups)


def test_bad_hyperparameters_name_the_flag():
    with pytest.raises(MegahetError, match="--lr"):
        setup(lr=-1.0)
    with pytest.raises(MegahetError, match="--clip-grad"):
        setup(clip_grad=-1.0)
    with pytest.raises(MegahetError, match="--ddp-bucket-size"):
        setup(bucket_size=0)


# ---------------------------------------------------------------------- buffers and overlap
def test_buckets_follow_backward_order_and_overlap_launches_only_when_enabled():
    model, ddp, _ = setup(bucket_size=3, overlap_grad_reduce=True)
    (buffer,) = ddp.buffers
    # Reverse of model.parameters() order (norm, lin.weight, lin.bias): the order backward finishes them.
    assert [p.global_name for p in buffer.params] == ["lin.bias", "lin.weight", "norm"]
    assert [b.numel for b in buffer.buckets] == [3, 12, 3]
    assert buffer.param_range(model.norm) == (15, 18) and buffer.shard_range(buffer.buckets[1]) == (3, 15)
    x = torch.randn(5, 4)
    ddp.zero_grad()
    ddp.enable_grad_sync(None, False)
    model(x).backward()
    assert not any(b.launched for b in buffer.buckets)  # accumulate only
    ddp.enable_grad_sync(0, True)
    model(x).backward()
    assert all(b.launched for b in buffer.buckets)  # reduced during backward
    with pytest.raises(RuntimeError, match="after its bucket was reduced"):
        model(x).backward()
    ddp.finish_grad_sync()
    ddp.zero_grad()
    assert not any(b.launched for b in buffer.buckets) and float(buffer.data.abs().sum()) == 0.0
