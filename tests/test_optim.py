"""Optimizer update rules against hand-computed steps and closed forms."""
import math

import numpy as np
import pytest

from nncore import optim

LR, MU = 0.1, 0.9


def run(rule, grads, config, w0=1.0, dtype=np.float64):
    """Apply `rule` to a one-element parameter for each gradient in turn; return w after each step."""
    w = np.array([w0], dtype=dtype)
    state = {}
    ws = []
    for g in grads:
        out, state_out = rule(w, np.array([g], dtype=dtype), state, config)
        assert out is w and state_out is state  # in place, same objects
        ws.append(float(w[0]))
    return ws, state


def test_sgd_two_steps():
    ws, state = run(optim.sgd, [0.5, -1.0], {"lr": LR})
    assert ws == pytest.approx([1.0 - 0.05, 0.95 + 0.1])
    assert state == {}


def test_momentum_hand_computed():
    # v1 = -0.1*0.5 = -0.05, w1 = 0.95; v2 = 0.9*-0.05 + 0.1 = 0.055, w2 = 1.005
    ws, state = run(optim.momentum, [0.5, -1.0], {"lr": LR, "momentum": MU})
    assert ws == pytest.approx([0.95, 1.005])
    assert state["v"] == pytest.approx([0.055])


def test_momentum_constant_gradient_closed_form():
    g = 2.0
    ws, _ = run(optim.momentum, [g] * 3, {"lr": LR, "momentum": MU})
    assert ws[-1] == pytest.approx(1.0 - LR * g * (3 + 2 * MU + MU**2))


def test_nesterov_hand_computed():
    # v1 = -0.05, w1 = 1 + 0.9*-0.05 - 0.05 = 0.905; v2 = 0.055, w2 = 0.905 + 0.9*0.055 + 0.1 = 1.0545
    ws, state = run(optim.nesterov, [0.5, -1.0], {"lr": LR, "momentum": MU})
    assert ws == pytest.approx([0.905, 1.0545])
    assert state["v"] == pytest.approx([0.055])


def test_nesterov_constant_gradient_closed_form():
    g = 2.0
    ws, _ = run(optim.nesterov, [g] * 2, {"lr": LR, "momentum": MU})
    assert ws[-1] == pytest.approx(1.0 - LR * g * (2 + 2 * MU + MU**2))


def test_adagrad_closed_form():
    g, eps = 0.5, 1e-8
    ws, state = run(optim.adagrad, [g] * 3, {"lr": LR, "eps": eps})
    expected = [1.0 - sum(LR * g / (math.sqrt(k) * g + eps) for k in range(1, t + 1)) for t in (1, 2, 3)]
    assert ws == pytest.approx(expected)
    assert state["cache"] == pytest.approx([3 * g * g])


def test_rmsprop_closed_form():
    g, d, eps = 0.5, 0.9, 1e-8
    ws, state = run(optim.rmsprop, [g] * 3, {"lr": LR, "decay_rate": d, "eps": eps})
    expected = [1.0 - sum(LR * g / (math.sqrt(1 - d**k) * g + eps) for k in range(1, t + 1)) for t in (1, 2, 3)]
    assert ws == pytest.approx(expected)
    assert state["cache"] == pytest.approx([(1 - d**3) * g * g])


def test_adam_hand_computed_with_bias_correction():
    b1, b2 = 0.9, 0.999
    ws, state = run(optim.adam, [0.5, -1.0], {"lr": LR, "beta1": b1, "beta2": b2, "eps": 0.0})
    # step 1: m_hat = 0.5, v_hat = 0.25 -> w1 = 1 - 0.1 * 0.5 / 0.5 = 0.9
    # step 2: m = 0.9*0.05 - 0.1 = -0.055, v = 0.999*0.00025 + 0.001 = 0.00124975
    m_hat = -0.055 / (1 - 0.81)
    v_hat = 0.00124975 / (1 - 0.999**2)
    assert ws == pytest.approx([0.9, 0.9 - 0.1 * m_hat / math.sqrt(v_hat)])
    assert int(state["t"]) == 2
    assert state["m"] == pytest.approx([-0.055])
    assert state["v"] == pytest.approx([0.00124975])


def test_adam_constant_gradient_moves_lr_per_step():
    # With bias correction m_hat = g and v_hat = g^2 exactly, so each step is lr * g / (|g| + eps).
    g, eps = 3.0, 1e-8
    ws, _ = run(optim.adam, [g] * 3, {"lr": LR, "beta1": 0.9, "beta2": 0.999, "eps": eps})
    assert ws == pytest.approx([1.0 - t * LR * g / (g + eps) for t in (1, 2, 3)], rel=1e-12)


@pytest.mark.parametrize("name", sorted(optim.UPDATES))
def test_float32_stays_float32_and_state_matches(name):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    w0 = w.copy()
    dw = rng.standard_normal((4, 3)).astype(np.float32)
    dw0 = dw.copy()
    state = {}
    config = {"lr": np.float64(1e-2)}  # a float64 scalar must not upcast the arithmetic
    for _ in range(2):
        out, state = optim.UPDATES[name](w, dw, state, config)
    assert out is w and w.dtype == np.float32
    assert not np.array_equal(w, w0)
    assert np.array_equal(dw, dw0)  # the gradient is not used as scratch
    for key, value in state.items():
        if key == "t":
            assert value.shape == () and value.dtype == np.int64
        else:
            assert value.dtype == np.float32 and value.shape == w.shape


@pytest.mark.parametrize("name", sorted(optim.UPDATES))
def test_step_with_scratch_allocates_nothing_and_matches(name):
    """With the caller's scratch buffer a step allocates no array (NumPy reports its buffers to tracemalloc);
    without one it allocates one temporary; both give the same bits."""
    import tracemalloc

    rng = np.random.default_rng(1)
    w = rng.standard_normal((512, 512)).astype(np.float32)
    dw = rng.standard_normal((512, 512)).astype(np.float32)
    config = {"lr": 1e-2}
    plain_w, plain_state = w.copy(), {}
    scratch, state = np.empty_like(w), {}
    for _ in range(2):  # the first step creates the state slots
        optim.UPDATES[name](plain_w, dw, plain_state, config)
        tracemalloc.start()
        try:
            optim.UPDATES[name](w, dw, state, config, scratch)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < w.nbytes // 100
    assert np.array_equal(w, plain_w) and all(np.array_equal(state[k], plain_state[k]) for k in state)
    tracemalloc.start()
    try:
        optim.UPDATES[name](plain_w, dw, plain_state, config)
        assert tracemalloc.get_traced_memory()[1] >= w.nbytes  # the test sees an allocation when there is one
    finally:
        tracemalloc.stop()


def test_defaults_fill_missing_keys():
    w = np.ones(2)
    optim.adam(w, np.ones(2), {}, {"lr": 0.5})
    assert w == pytest.approx([0.5, 0.5])


def test_clip_gradients_scales_to_max_norm():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    norm = optim.clip_gradients(grads, 1.0)
    assert norm == pytest.approx(5.0)
    assert grads["a"] == pytest.approx([0.6, 0.0])
    assert grads["b"] == pytest.approx(np.array([[0.8]]))
    assert optim.clip_gradients(grads, 1.0) == pytest.approx(1.0)


@pytest.mark.parametrize("max_norm", [10.0, 0.0])
def test_clip_gradients_leaves_small_or_disabled(max_norm):
    grads = {"a": np.array([3.0, 4.0], dtype=np.float32)}
    assert optim.clip_gradients(grads, max_norm) == pytest.approx(5.0)
    assert np.array_equal(grads["a"], np.array([3.0, 4.0], dtype=np.float32))
