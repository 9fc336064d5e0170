"""LRScheduler: Megatron warmup/decay values at the key steps, lr_mult, JSON state round trip."""
import json
import math

import pytest
import torch

from megahet.errors import MegahetError
from megahet.training.lr_schedule import LRScheduler


def _optimizer(lr_mults=(None,)):
    groups = []
    for mult in lr_mults:
        group = {"params": [torch.nn.Parameter(torch.zeros(1))]}
        if mult is not None:
            group["lr_mult"] = mult
        groups.append(group)
    return torch.optim.SGD(groups, lr=1.0)


def _sched(style, **kw):
    args = dict(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=110, decay_style=style)
    args.update(kw)
    return LRScheduler(_optimizer(), **args)


def test_cosine_values_at_key_steps():
    s = _sched("cosine")
    assert s.get_lr(0) == 0.0
    assert s.get_lr(5) == pytest.approx(5e-4)
    assert s.get_lr(10) == pytest.approx(1e-3)
    assert s.get_lr(60) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way: cos(pi/2) = 0
    assert s.get_lr(35) == pytest.approx(1e-4 + 9e-4 * 0.5 * (math.cos(math.pi / 4) + 1))
    assert s.get_lr(110) == pytest.approx(1e-4)
    assert s.get_lr(500) == 1e-4


def test_linear_and_constant_values():
    s = _sched("linear")
    assert s.get_lr(10) == pytest.approx(1e-3)
    assert s.get_lr(60) == pytest.approx(5.5e-4)
    assert s.get_lr(85) == pytest.approx(1e-4 + 9e-4 * 0.25)
    assert s.get_lr(110) == pytest.approx(1e-4)
    assert s.get_lr(111) == 1e-4
    c = _sched("constant")
    assert c.get_lr(3) == pytest.approx(3e-4)
    assert c.get_lr(10) == c.get_lr(60) == c.get_lr(10_000) == 1e-3


def test_inverse_square_root_and_wsd():
    s = _sched("inverse-square-root", min_lr=0.0)
    assert s.get_lr(40) == pytest.approx(1e-3 * math.sqrt(10) / math.sqrt(40))
    w = _sched("WSD", wsd_decay_steps=20)
    assert w.get_lr(50) == w.get_lr(90) == pytest.approx(1e-3)  # stable phase
    assert w.get_lr(100) == pytest.approx(1e-4 + 9e-4 * 0.5)  # linear anneal half way
    assert w.get_lr(110) == pytest.approx(1e-4)


def test_no_warmup_starts_at_max():
    s = _sched("cosine", warmup_steps=0)
    assert s.get_lr(0) == pytest.approx(1e-3)


def test_step_sets_every_group_with_lr_mult():
    opt = _optimizer(lr_mults=(None, 0.1))
    s = LRScheduler(opt, max_lr=1e-3, min_lr=0.0, warmup_steps=4, decay_steps=8)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]  # step 0 set by the constructor
    assert s.step() == pytest.approx(2.5e-4)
    assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-4)
    assert opt.param_groups[1]["lr"] == pytest.approx(2.5e-5)
    for _ in range(3):
        s.step()
    assert s.num_steps == 4 and s.lr == pytest.approx(1e-3)
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-4)


def test_state_dict_round_trips_through_json():
    s = _sched("cosine")
    for _ in range(37):
        s.step()
    state = json.loads(json.dumps(s.state_dict()))
    opt = _optimizer()
    t = LRScheduler(opt, max_lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=110)
    t.load_state_dict(state)
    assert t.num_steps == 37
    assert opt.param_groups[0]["lr"] == pytest.approx(s.get_lr(37))
    assert t.step() == pytest.approx(s.step())


def test_load_keeps_this_runs_settings_and_warns(caplog):
    s = _sched("cosine")
    s.step()
    longer = _sched("cosine", decay_steps=220)
    with caplog.at_level("WARNING"):
        longer.load_state_dict(s.state_dict())
    assert longer.decay_steps == 220 and longer.num_steps == 1
    assert "decay_steps: 110 -> 220" in caplog.text
    with pytest.raises(MegahetError, match="--load"):
        longer.load_state_dict({"steps": 3})


@pytest.mark.parametrize("kw, flag", [
    (dict(min_lr=2e-3), "--min-lr"),
    (dict(warmup_steps=200), "--lr-warmup-iters"),
    (dict(warmup_steps=-1), "--lr-warmup-iters"),
    (dict(decay_steps=0, warmup_steps=0), "--lr-decay-iters"),
    (dict(decay_style="exp"), "--lr-decay-style"),
    (dict(max_lr=float("nan")), "--lr"),
    (dict(decay_style="WSD"), "--lr-wsd-decay-iters"),
    (dict(decay_style="WSD", wsd_decay_steps=101), "--lr-wsd-decay-iters"),
])
def test_bad_settings_name_the_flag(kw, flag):
    kw = dict(kw)
    with pytest.raises(MegahetError, match=flag):
        _sched(kw.pop("decay_style", "cosine"), **kw)
