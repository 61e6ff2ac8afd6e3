"""Tests for nncore.init: standard deviations checked statistically, shapes, dtypes and reproducibility."""
import math

import numpy as np
import pytest

from nncore.init import INIT_KINDS, he, init_weight, small_random, xavier

# 400 x 600 = 240,000 samples: the sample std is within 1% of the true std with overwhelming
# probability (its relative standard error is 1 / sqrt(2 n) ~ 0.14%), the mean within 6 standard errors.
FAN_IN, FAN_OUT = 400, 600


def _assert_normal(w, std):
    assert abs(w.std() / std - 1) < 0.01
    assert abs(w.mean()) < 6 * std / math.sqrt(w.size)


def test_xavier_std_is_sqrt_2_over_fan_in_plus_fan_out():
    w = xavier(FAN_IN, FAN_OUT, np.random.default_rng(0))
    assert w.shape == (FAN_IN, FAN_OUT) and w.dtype == np.float32
    _assert_normal(w, math.sqrt(2 / (FAN_IN + FAN_OUT)))


def test_he_std_is_sqrt_2_over_fan_in():
    w = he(FAN_IN, FAN_OUT, np.random.default_rng(1), np.float64)
    assert w.shape == (FAN_IN, FAN_OUT) and w.dtype == np.float64
    _assert_normal(w, math.sqrt(2 / FAN_IN))


def test_small_random_std_is_the_scale():
    w = small_random((FAN_IN, FAN_OUT), np.random.default_rng(2), scale=0.05)
    assert w.dtype == np.float32
    _assert_normal(w, 0.05)


def test_he_keeps_the_second_moment_of_relu_activations():
    # With std sqrt(2 / fan_in), E[relu(x @ W)^2] per unit equals E[x^2] per input (He et al. 2015).
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2000, 500))
    out = np.maximum(x @ he(500, 300, rng, np.float64), 0)
    assert np.mean(out ** 2) == pytest.approx(np.mean(x ** 2), rel=0.05)


@pytest.mark.parametrize("kind", INIT_KINDS)
def test_init_weight_dispatches_on_kind_with_any_shape(kind):
    shape, fan_in, fan_out = (64, 16, 5), 80, 320  # a conv weight (F, C, K)
    w = init_weight(kind, shape, fan_in, fan_out, np.random.default_rng(4), scale=0.2, dtype=np.float64)
    assert w.shape == shape and w.dtype == np.float64
    expected = {"he": math.sqrt(2 / fan_in), "xavier": math.sqrt(2 / (fan_in + fan_out)), "small": 0.2}[kind]
    assert abs(w.std() / expected - 1) < 0.05


def test_same_seed_gives_same_weights():
    a = init_weight("he", (5, 6), 5, 6, np.random.default_rng(7))
    b = init_weight("he", (5, 6), 5, 6, np.random.default_rng(7))
    c = init_weight("he", (5, 6), 5, 6, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_unknown_kind_and_dtype_are_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown kind 'orthogonal'"):
        init_weight("orthogonal", (2, 2), 2, 2, rng)
    with pytest.raises(ValueError, match="float32 or float64"):
        he(2, 2, rng, np.int32)
