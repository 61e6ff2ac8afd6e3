"""Learning-rate schedules against their closed forms."""
import math

import pytest

from nncore.errors import ConfigError
from nncore.schedules import SCHEDULES, lr_at

BASE = {"lr": 0.1, "lr_decay": 0.5, "lr_step": 3, "epochs": 10, "lr_min": 0.0}


def cfg(**kw):
    return {**BASE, **kw}


def test_constant():
    assert [lr_at(e, cfg(lr_schedule="constant")) for e in (0, 5, 100)] == [0.1] * 3


def test_step_decays_every_lr_step_epochs():
    c = cfg(lr_schedule="step")
    assert [lr_at(e, c) for e in (0, 2, 2.9, 3, 5, 6)] == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.025])


def test_exponential():
    c = cfg(lr_schedule="exponential", lr_decay=0.9)
    for e in (0, 1, 2.5, 7):
        assert lr_at(e, c) == pytest.approx(0.1 * 0.9**e)


def test_inverse_time():
    c = cfg(lr_schedule="inverse_time", lr_decay=0.5)
    for e in (0, 1, 4, 10.5):
        assert lr_at(e, c) == pytest.approx(0.1 / (1 + 0.5 * e))


def test_cosine_endpoints_midpoint_and_hold():
    c = cfg(lr_schedule="cosine", lr_min=0.01)
    assert lr_at(0, c) == pytest.approx(0.1)
    assert lr_at(5, c) == pytest.approx(0.01 + 0.5 * 0.09)
    assert lr_at(2.5, c) == pytest.approx(0.01 + 0.5 * 0.09 * (1 + math.cos(math.pi / 4)))
    assert lr_at(10, c) == pytest.approx(0.01)
    assert lr_at(15, c) == pytest.approx(0.01)


def test_lr_min_floors_decay():
    c = cfg(lr_schedule="exponential", lr_decay=0.5, lr_min=0.02)
    assert lr_at(1, c) == pytest.approx(0.05)
    assert lr_at(10, c) == 0.02


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_schedule_starts_at_lr_and_is_pure(name):
    c = cfg(lr_schedule=name)
    snapshot = dict(c)
    assert lr_at(0, c) == pytest.approx(0.1)
    assert lr_at(4, c) == lr_at(4, c)
    assert c == snapshot


def test_unknown_schedule_names_the_field():
    with pytest.raises(ConfigError, match=r"^solver\.lr_schedule: .*'linear'"):
        lr_at(0, cfg(lr_schedule="linear"))
