import pytest

from pyrovae.config import resolve_config
from pyrovae.errors import ConfigError
from pyrovae.schedules import CappedLinear, Constant, Cyclical, ExponentialDecay, LinearWarmup, Logistic


def test_constant():
    assert [Constant(0.7)(t) for t in (0, 10, 10**6)] == [0.7, 0.7, 0.7]


def test_linear_warmup():
    schedule = LinearWarmup(warmup_steps=100)
    assert schedule(0) == 0.0
    assert schedule(25) == pytest.approx(0.25)
    assert schedule(100) == 1.0
    assert schedule(5000) == 1.0
    assert LinearWarmup(warmup_steps=10, start=0.2, end=0.6)(5) == pytest.approx(0.4)


def test_logistic_is_half_at_midpoint_and_saturates():
    schedule = Logistic(midpoint=2500, k=0.0025)
    assert schedule(2500) == pytest.approx(0.5)
    assert schedule(0) == pytest.approx(1 / (1 + 2.718281828459045**6.25), rel=1e-9)
    assert schedule(10**6) == pytest.approx(1.0)
    assert schedule(-10**6) == 0.0  # no overflow far left


def test_cyclical_matches_fu_et_al():
    # 4 cycles over 400 steps, ramp over the first half of each cycle.
    schedule = Cyclical(total_steps=400, cycles=4, ratio=0.5)
    assert [schedule(t) for t in (0, 25, 50, 75, 99)] == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert schedule(100) == 0.0  # a new cycle starts from zero
    assert schedule(125) == pytest.approx(0.5)
    assert schedule(400) == 1.0
    assert schedule(10**5) == 1.0


def test_capped_linear_matches_liang_et_al():
    schedule = CappedLinear(anneal_steps=1000, cap=0.2)
    assert schedule(0) == 0.0
    assert schedule(100) == pytest.approx(0.1)
    assert schedule(200) == pytest.approx(0.2)
    assert schedule(900) == pytest.approx(0.2)


def test_exponential_decay_for_temperatures():
    schedule = ExponentialDecay(rate=0.01, initial=1.0, minimum=0.5)
    assert schedule(0) == 1.0
    assert schedule(10) == pytest.approx(0.9048374180359595)
    assert schedule(10**4) == 0.5


@pytest.mark.parametrize("bad", [LinearWarmup, CappedLinear])
def test_nonpositive_lengths_are_rejected(bad):
    with pytest.raises(ValueError):
        bad(0)


def test_schedule_from_config_is_type_checked():
    with pytest.raises(ConfigError, match="missing required key 'warmup_steps'"):
        resolve_config({"data": {"name": "digits"}, "model": {"name": "vae"}, "anneal": {"name": "linear"}})
    resolved = resolve_config(
        {"data": {"name": "digits"}, "model": {"name": "vae"}, "anneal": {"name": "cyclical", "total_steps": 10}}
    )
    assert resolved["anneal"] == {"name": "cyclical", "total_steps": 10, "cycles": 4, "ratio": 0.5, "start": 0.0, "end": 1.0}
