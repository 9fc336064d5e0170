"""Loss scalers: Megatron's back-off / hysteresis / growth sequence and JSON state."""
import json

import pytest

from megahet.errors import MegahetError
from megahet.training.loss_scaler import ConstantLossScaler, DynamicLossScaler, build_loss_scaler


def test_hysteresis_then_backoff_then_floor():
    s = DynamicLossScaler(initial_scale=8.0, min_scale=2.0, growth_interval=3, hysteresis=2)
    s.update(True)
    assert s.scale == 8.0  # first overflow is absorbed by hysteresis
    s.update(True)
    assert s.scale == 4.0
    s.update(True)  # hysteresis stays exhausted until a growth: back off every overflow
    assert s.scale == 2.0
    s.update(True)
    assert s.scale == 2.0  # min_scale floor
    assert isinstance(s.scale, float)


def test_growth_after_interval_and_overflow_resets_the_count():
    s = DynamicLossScaler(initial_scale=4.0, growth_interval=3, hysteresis=2)
    for found_inf in (False, False, True, False, False):
        s.update(found_inf)
    assert s.scale == 4.0  # the overflow reset the clean-step count
    s.update(False)
    assert s.scale == 8.0
    s.update(True)  # growth restored hysteresis: one overflow is tolerated again
    assert s.scale == 8.0
    s.update(True)
    assert s.scale == 4.0


def test_state_round_trips_through_json():
    s = DynamicLossScaler(initial_scale=2.0 ** 16, growth_interval=4, hysteresis=3)
    for found_inf in (True, False, False):
        s.update(found_inf)
    state = json.loads(json.dumps(s.state_dict()))
    t = DynamicLossScaler(initial_scale=2.0 ** 16, growth_interval=4, hysteresis=3)
    t.load_state_dict(state)
    assert t.state_dict() == s.state_dict()
    for found_inf in (False, False, True, True):
        s.update(found_inf)
        t.update(found_inf)
        assert t.scale == s.scale
    with pytest.raises(MegahetError, match="--load"):
        t.load_state_dict({"scale": 1.0})


def test_constant_and_factory():
    c = ConstantLossScaler(128)
    c.update(True)
    assert c.scale == 128.0 and not c.dynamic
    assert build_loss_scaler(fp16=False).scale == 1.0
    assert build_loss_scaler(fp16=True, loss_scale=64).scale == 64.0
    dyn = build_loss_scaler(fp16=True, initial_scale=1024.0)
    assert dyn.dynamic and dyn.scale == 1024.0


@pytest.mark.parametrize("kw, flag", [
    (dict(initial_scale=0), "--initial-loss-scale"),
    (dict(initial_scale=4.0, min_scale=8.0), "--min-loss-scale"),
    (dict(growth_interval=0), "--loss-scale-window"),
    (dict(hysteresis=0), "--hysteresis"),
    (dict(backoff=1.5), "backoff"),
    (dict(growth=1.0), "growth"),
])
def test_bad_settings_name_the_flag(kw, flag):
    with pytest.raises(MegahetError, match=flag):
        DynamicLossScaler(**kw)
    with pytest.raises(MegahetError, match="--loss-scale"):
        ConstantLossScaler(-1)
