"""Tests for nncore.layers: forward values against naive references, gradients against finite differences."""
from functools import partial

import numpy as np
import pytest

from nncore import layers
from nncore.gradcheck import eval_numerical_gradient, rel_error

SMOOTH, KINKED = 1e-7, 1e-5


def _signed(rng, shape, lo=0.05, hi=1.5):
    """Values of random sign with |v| in [lo, hi]: at least lo away from a kink at 0."""
    return rng.uniform(lo, hi, shape) * rng.choice([-1.0, 1.0], shape)


def _distinct(rng, shape, step=0.1):
    """A random arrangement of distinct values at least `step` apart (no ties for max-based layers)."""
    return (rng.permutation(int(np.prod(shape))).reshape(shape) - np.prod(shape) / 2) * step


def _bn_state(c, rng=None):
    if rng is None:
        return {"mean": np.zeros(c), "var": np.ones(c)}
    return {"mean": rng.standard_normal(c), "var": rng.uniform(0.5, 2.0, c)}


def _without_bias_grad(dout, cache):
    dx, dw, db = layers.affine_backward(dout, cache)
    assert db is None
    return dx, dw


def _without_conv_bias_grad(dout, cache):
    dx, dw, db = layers.conv2d_backward(dout, cache)
    assert db is None
    return dx, dw


def _case(name, rng):
    """(forward(*arrays) -> out, backward(dout, cache) -> grads (one per array), arrays, tolerance)."""
    if name == "affine":
        arrays = [rng.standard_normal((4, 3, 2)), rng.standard_normal((6, 5)), rng.standard_normal(5)]
        return layers.affine_forward, layers.affine_backward, arrays, SMOOTH
    if name == "affine_no_bias":
        arrays = [rng.standard_normal((4, 6)), rng.standard_normal((6, 5))]
        return layers.affine_forward, _without_bias_grad, arrays, SMOOTH
    if name == "relu":
        return layers.relu_forward, layers.relu_backward, [_signed(rng, (5, 6))], KINKED
    if name == "leaky_relu":
        fwd = partial(layers.leaky_relu_forward, alpha=0.1)
        return fwd, layers.leaky_relu_backward, [_signed(rng, (5, 6))], KINKED
    if name == "elu":
        fwd = partial(layers.elu_forward, alpha=1.3)
        return fwd, layers.elu_backward, [_signed(rng, (5, 6), lo=0.1)], SMOOTH
    if name == "tanh":
        return layers.tanh_forward, layers.tanh_backward, [rng.standard_normal((5, 6))], SMOOTH
    if name == "sigmoid":
        return layers.sigmoid_forward, layers.sigmoid_backward, [2 * rng.standard_normal((5, 6))], SMOOTH
    if name == "maxout":
        # pieces of each unit differ by >= 0.25 in their biases, so perturbing w never changes the winner.
        x, w = rng.uniform(-1, 1, (5, 4)), 0.02 * rng.standard_normal((4, 9))
        b = _distinct(rng, (9,), step=0.25)
        fwd = partial(layers.maxout_forward, pieces=3)
        return fwd, layers.maxout_backward, [x, w, b], KINKED
    if name == "dropout":
        mask = layers.dropout_mask((5, 6), 0.4, rng, np.float64)
        fwd = partial(layers.dropout_forward, p=0.4, train=True, mask=mask)
        return fwd, layers.dropout_backward, [rng.standard_normal((5, 6))], SMOOTH
    if name in ("batchnorm_train", "batchnorm_test", "batchnorm_conv", "batchnorm_spatial"):
        shapes = {"batchnorm_conv": (6, 3, 4), "batchnorm_spatial": (4, 3, 3, 2)}
        train, shape = name != "batchnorm_test", shapes.get(name, (6, 4))
        c = shape[1]
        state = _bn_state(c, None if train else rng)
        arrays = [2 * rng.standard_normal(shape) + 1, rng.uniform(0.5, 1.5, c), rng.standard_normal(c)]
        fwd = partial(layers.batchnorm_forward, bn_state=state, train=train)
        return fwd, layers.batchnorm_backward, arrays, SMOOTH
    if name == "conv1d":
        arrays = [rng.standard_normal((3, 2, 9)), rng.standard_normal((4, 2, 3)), rng.standard_normal(4)]
        fwd = partial(layers.conv1d_forward, stride=1, pad=1)
        return fwd, layers.conv1d_backward, arrays, SMOOTH
    if name == "conv1d_strided":
        arrays = [rng.standard_normal((2, 3, 11)), rng.standard_normal((2, 3, 4)), rng.standard_normal(2)]
        fwd = partial(layers.conv1d_forward, stride=2, pad=2)
        return fwd, layers.conv1d_backward, arrays, SMOOTH
    if name == "maxpool1d":
        fwd = partial(layers.maxpool1d_forward, pool=3)
        return fwd, layers.maxpool1d_backward, [_distinct(rng, (2, 3, 10))], KINKED
    if name == "conv2d":
        arrays = [rng.standard_normal((2, 2, 5, 4)), rng.standard_normal((3, 2, 3, 3)), rng.standard_normal(3)]
        fwd = partial(layers.conv2d_forward, stride=1, pad=1)
        return fwd, layers.conv2d_backward, arrays, SMOOTH
    if name == "conv2d_one_channel":  # few channels, long rows: columns gathered channels-first
        arrays = [rng.standard_normal((2, 1, 5, 7)), rng.standard_normal((3, 1, 3, 3)), rng.standard_normal(3)]
        fwd = partial(layers.conv2d_forward, stride=1, pad=1)
        return fwd, layers.conv2d_backward, arrays, SMOOTH
    if name == "conv2d_strided":
        arrays = [rng.standard_normal((2, 3, 7, 6)), rng.standard_normal((2, 3, 3, 2)), rng.standard_normal(2)]
        fwd = partial(layers.conv2d_forward, stride=2, pad=2)
        return fwd, layers.conv2d_backward, arrays, SMOOTH
    if name == "conv2d_no_bias":
        arrays = [rng.standard_normal((2, 2, 4, 4)), rng.standard_normal((3, 2, 2, 2))]
        return layers.conv2d_forward, _without_conv_bias_grad, arrays, SMOOTH
    if name == "maxpool2d":
        fwd = partial(layers.maxpool2d_forward, pool=2)
        return fwd, layers.maxpool2d_backward, [_distinct(rng, (2, 3, 5, 6))], KINKED
    raise AssertionError(name)


CASES = ["affine", "affine_no_bias", "relu", "leaky_relu", "elu", "tanh", "sigmoid", "maxout", "dropout",
         "batchnorm_train", "batchnorm_test", "batchnorm_conv", "batchnorm_spatial", "conv1d", "conv1d_strided",
         "maxpool1d", "conv2d", "conv2d_one_channel", "conv2d_strided", "conv2d_no_bias", "maxpool2d"]


def _single(grads):
    return grads if isinstance(grads, tuple) else (grads,)


@pytest.mark.parametrize("name", CASES)
def test_gradients_match_finite_differences(name):
    rng = np.random.default_rng(sum(map(ord, name)))
    forward, backward, arrays, tol = _case(name, rng)
    out, cache = forward(*arrays)
    dout = rng.standard_normal(out.shape)
    analytic = _single(backward(dout.copy(), cache))
    assert len(analytic) == len(arrays)
    for i, (array, grad) in enumerate(zip(arrays, analytic)):
        numeric = eval_numerical_gradient(lambda _: forward(*arrays)[0], array, h=1e-5, dout=dout)
        assert grad.shape == array.shape
        assert rel_error(grad, numeric) < tol, f"{name}: input {i}"


@pytest.mark.parametrize("name", CASES)
def test_float32_stays_float32(name):
    rng = np.random.default_rng(0)
    forward, backward, arrays, _ = _case(name, rng)
    out, cache = forward(*(a.astype(np.float32) for a in arrays))
    assert out.dtype == np.float32
    for grad in _single(backward(np.ones_like(out), cache)):
        assert grad.dtype == np.float32


def test_affine_forward_is_a_matrix_product_and_keeps_input_shape_in_dx():
    rng = np.random.default_rng(1)
    x, w, b = rng.standard_normal((4, 3, 2)), rng.standard_normal((6, 5)), rng.standard_normal(5)
    out, cache = layers.affine_forward(x, w, b)
    np.testing.assert_allclose(out, x.reshape(4, 6) @ w + b)
    dx, dw, db = layers.affine_backward(np.ones((4, 5)), cache)
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == b.shape
    assert layers.affine_backward(np.ones((4, 5)), cache, input_grad=False)[0] is None
    assert layers.affine_backward(np.ones((4, 5)), layers.affine_forward(x, w)[1])[2] is None


def test_affine_forward_does_not_copy_2d_input():
    x = np.ones((3, 4))
    _, (cached, _, _) = layers.affine_forward(x, np.ones((4, 2)), np.zeros(2))
    assert cached is x


def test_relu_in_place_variants_write_into_the_given_buffer():
    x = np.array([[-1.0, 2.0, -3.0, 4.0]])
    out, cache = layers.relu_forward(x.copy())
    assert out.tolist() == [[0.0, 2.0, 0.0, 4.0]]
    buf = x.copy()
    out, cache = layers.relu_forward(buf, out=buf)
    assert out is buf and buf.tolist() == [[0.0, 2.0, 0.0, 4.0]]
    dout = np.array([[5.0, 6.0, 7.0, 8.0]])
    assert layers.relu_backward(dout, cache).tolist() == [[0.0, 6.0, 0.0, 8.0]]
    assert dout.tolist() == [[5.0, 6.0, 7.0, 8.0]]
    dx = layers.relu_backward(dout, cache, out=dout)
    assert dx is dout and dout.tolist() == [[0.0, 6.0, 0.0, 8.0]]


def test_activation_closed_forms():
    x = np.array([-2.0, -0.5, 0.5, 3.0])
    np.testing.assert_allclose(layers.leaky_relu_forward(x, 0.1)[0], [-0.2, -0.05, 0.5, 3.0])
    np.testing.assert_allclose(layers.elu_forward(x, 2.0)[0], [2 * np.expm1(-2.0), 2 * np.expm1(-0.5), 0.5, 3.0])
    np.testing.assert_allclose(layers.sigmoid_forward(x)[0], 1 / (1 + np.exp(-x)), rtol=1e-15)
    np.testing.assert_allclose(layers.tanh_forward(x)[0], np.tanh(x))


def test_sigmoid_and_elu_are_finite_for_huge_inputs():
    x = np.array([-1e4, -50.0, 50.0, 1e4], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        sig, _ = layers.sigmoid_forward(x)
        elu, _ = layers.elu_forward(x)
    np.testing.assert_allclose(sig, [0.0, np.exp(-50.0), 1.0, 1.0], rtol=1e-6, atol=0)
    np.testing.assert_allclose(elu, [-1.0, -1.0, 50.0, 1e4])


def test_maxout_takes_the_max_over_each_units_pieces():
    x = np.eye(2)
    w = np.array([[1.0, 5.0, -1.0, -2.0], [3.0, 2.0, 0.0, 7.0]])  # unit 0: columns 0, 1; unit 1: columns 2, 3
    out, _ = layers.maxout_forward(x, w, np.zeros(4), pieces=2)
    assert out.tolist() == [[5.0, -1.0], [3.0, 7.0]]
    with pytest.raises(ValueError, match="groups of 3"):
        layers.maxout_forward(x, w, np.zeros(4), pieces=3)


def test_dropout_preserves_the_expected_activation():
    rng = np.random.default_rng(2)
    x = rng.uniform(0.5, 2.0, (4, 5))
    p, draws = 0.3, 20000
    total = np.zeros_like(x)
    zeros = 0
    for _ in range(draws):
        out, mask = layers.dropout_forward(x, p, True, rng=rng)
        total += out
        zeros += np.count_nonzero(out == 0)
    # E[out] = x; each entry's mean over draws has std x * sqrt(p / (1 - p) / draws) <= 0.0093.
    np.testing.assert_allclose(total / draws, x, atol=0.05)
    assert abs(zeros / (draws * x.size) - p) < 0.005
    assert set(np.unique(mask)) <= {0.0, 1 / (1 - p)}


def test_dropout_is_identity_in_test_mode_and_with_p_zero():
    x = np.arange(6.0).reshape(2, 3)
    assert layers.dropout_forward(x, 0.5, False)[0] is x
    assert layers.dropout_forward(x, 0.0, True)[0] is x
    assert layers.dropout_backward(x, None) is x
    with pytest.raises(ValueError, match="mask or an rng"):
        layers.dropout_forward(x, 0.5, True)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        layers.dropout_mask((2,), 1.0, np.random.default_rng(0))


def test_dropout_uses_a_given_mask():
    x = np.ones((2, 2))
    mask = np.array([[0.0, 2.0], [2.0, 0.0]])
    out, _ = layers.dropout_forward(x, 0.5, True, mask=mask, rng=np.random.default_rng(0))
    assert out.tolist() == mask.tolist()


def test_batchnorm_train_normalizes_and_updates_running_stats():
    rng = np.random.default_rng(3)
    x = 3 * rng.standard_normal((50, 4)) + 7
    state = _bn_state(4)
    out, _ = layers.batchnorm_forward(x, np.full(4, 2.0), np.full(4, -1.0), state, True, momentum=0.9, eps=0)
    np.testing.assert_allclose(out.mean(axis=0), -1.0, atol=1e-12)
    np.testing.assert_allclose(out.std(axis=0), 2.0, rtol=1e-12)
    np.testing.assert_allclose(state["mean"], 0.1 * x.mean(axis=0))
    np.testing.assert_allclose(state["var"], 0.9 + 0.1 * x.var(axis=0))


def test_batchnorm_test_mode_uses_running_stats_and_leaves_them():
    rng = np.random.default_rng(4)
    state = _bn_state(3, rng)
    before = {k: v.copy() for k, v in state.items()}
    x, gamma, beta = rng.standard_normal((5, 3)), rng.uniform(1, 2, 3), rng.standard_normal(3)
    out, _ = layers.batchnorm_forward(x, gamma, beta, state, False, eps=1e-5)
    np.testing.assert_allclose(out, (x - before["mean"]) / np.sqrt(before["var"] + 1e-5) * gamma + beta)
    for key in state:
        np.testing.assert_array_equal(state[key], before[key])


def test_batchnorm_on_sequences_normalizes_each_channel_over_batch_and_length():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 3, 5)) * np.array([1.0, 2.0, 3.0])[:, None] + 4
    out, _ = layers.batchnorm_forward(x, np.ones(3), np.zeros(3), _bn_state(3), True, eps=0)
    np.testing.assert_allclose(out.mean(axis=(0, 2)), 0, atol=1e-12)
    np.testing.assert_allclose(out.std(axis=(0, 2)), 1, rtol=1e-12)


def _naive_conv1d(x, w, b, stride, pad):
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad)))
    n, f, k = len(x), len(w), w.shape[2]
    l_out = (xp.shape[2] - k) // stride + 1
    out = np.zeros((n, f, l_out))
    for i in range(n):
        for j in range(f):
            for t in range(l_out):
                out[i, j, t] = np.sum(xp[i, :, t * stride:t * stride + k] * w[j]) + b[j]
    return out


@pytest.mark.parametrize("stride, pad", [(1, 0), (1, 2), (2, 1), (3, 0)])
def test_conv1d_matches_naive_convolution(stride, pad):
    rng = np.random.default_rng(6)
    x, w, b = rng.standard_normal((2, 3, 10)), rng.standard_normal((4, 3, 3)), rng.standard_normal(4)
    out, _ = layers.conv1d_forward(x, w, b, stride=stride, pad=pad)
    np.testing.assert_allclose(out, _naive_conv1d(x, w, b, stride, pad), rtol=1e-12, atol=1e-12)


def test_conv1d_rejects_inputs_shorter_than_the_kernel():
    with pytest.raises(ValueError, match="shorter than the kernel"):
        layers.conv1d_forward(np.ones((1, 1, 2)), np.ones((1, 1, 3)), np.zeros(1))


def test_maxpool1d_takes_window_maxima_and_routes_gradients_to_them():
    x = np.array([[[1.0, 5.0, 2.0, 4.0, 3.0, 0.0, 9.0]]])
    out, cache = layers.maxpool1d_forward(x, 2)
    assert out.tolist() == [[[5.0, 4.0, 3.0]]]
    dx = layers.maxpool1d_backward(np.array([[[10.0, 20.0, 30.0]]]), cache)
    assert dx.tolist() == [[[0.0, 10.0, 0.0, 20.0, 30.0, 0.0, 0.0]]]


def test_maxpool1d_sends_a_tied_windows_gradient_to_exactly_one_entry():
    x = np.array([[[2.0, 2.0, 0.0, 0.0, 1.0, 3.0]]])
    out, cache = layers.maxpool1d_forward(x, 3)
    assert out.tolist() == [[[2.0, 3.0]]]
    dx = layers.maxpool1d_backward(np.array([[[10.0, 20.0]]]), cache)
    assert dx.tolist() == [[[10.0, 0.0, 0.0, 0.0, 0.0, 20.0]]]


def _naive_conv2d(x, w, b, stride, pad):
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    h_out, w_out = (xp.shape[2] - kh) // stride + 1, (xp.shape[3] - kw) // stride + 1
    out = np.zeros((len(x), len(w), h_out, w_out))
    for i in range(len(x)):
        for j in range(len(w)):
            for r in range(h_out):
                for s in range(w_out):
                    patch = xp[i, :, r * stride:r * stride + kh, s * stride:s * stride + kw]
                    out[i, j, r, s] = np.sum(patch * w[j]) + (0.0 if b is None else b[j])
    return out


@pytest.mark.parametrize("channels", [1, 3])  # 1: columns gathered channels-first for stride 1
@pytest.mark.parametrize("stride, pad, kernel", [(1, 0, (3, 3)), (1, 1, (3, 3)), (2, 1, (3, 2)), (3, 2, (1, 4))])
def test_conv2d_matches_naive_convolution(stride, pad, kernel, channels):
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal((2, channels, 7, 8)), rng.standard_normal((4, channels) + kernel)
    b = rng.standard_normal(4)
    out, _ = layers.conv2d_forward(x, w, b, stride=stride, pad=pad)
    np.testing.assert_allclose(out, _naive_conv2d(x, w, b, stride, pad), rtol=1e-12, atol=1e-12)
    out, _ = layers.conv2d_forward(x, w, stride=stride, pad=pad)
    np.testing.assert_allclose(out, _naive_conv2d(x, w, None, stride, pad), rtol=1e-12, atol=1e-12)


def test_conv2d_gives_the_same_results_for_channels_last_memory():
    rng = np.random.default_rng(8)
    x, w, b = rng.standard_normal((2, 3, 6, 5)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    x_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    dout = rng.standard_normal((2, 4, 6, 5))
    for pad in (0, 1):
        dout_pad = dout[:, :, :6 + 2 * pad - 2, :5 + 2 * pad - 2]
        out_a, cache_a = layers.conv2d_forward(x, w, b, pad=pad)
        out_b, cache_b = layers.conv2d_forward(x_last, w, b, pad=pad)
        np.testing.assert_allclose(out_a, out_b, rtol=1e-12)
        for ga, gb in zip(layers.conv2d_backward(dout_pad, cache_a), layers.conv2d_backward(dout_pad, cache_b)):
            np.testing.assert_allclose(ga, gb, rtol=1e-12)


def test_conv2d_rejects_inputs_smaller_than_the_kernel():
    with pytest.raises(ValueError, match="shorter than the kernel"):
        layers.conv2d_forward(np.ones((1, 1, 5, 2)), np.ones((1, 1, 3, 3)))


def test_conv2d_without_input_grad_returns_only_parameter_gradients():
    rng = np.random.default_rng(9)
    out, cache = layers.conv2d_forward(rng.standard_normal((2, 2, 4, 4)), rng.standard_normal((3, 2, 3, 3)),
                                       np.zeros(3), pad=1)
    dx, dw, db = layers.conv2d_backward(np.ones_like(out), cache, input_grad=False)
    assert dx is None and dw.shape == (3, 2, 3, 3) and dw.flags.c_contiguous and db.tolist() == [32.0] * 3


def test_maxpool2d_takes_window_maxima_drops_the_remainder_and_routes_gradients():
    x = np.arange(30, dtype=float).reshape(1, 1, 5, 6) % 7
    out, cache = layers.maxpool2d_forward(x, 2)
    expected = [[max(x[0, 0, 2 * r + i, 2 * s + j] for i in (0, 1) for j in (0, 1)) for s in range(3)]
                for r in range(2)]
    assert out.tolist() == [[expected]]
    dout = np.arange(1.0, 7.0).reshape(1, 1, 2, 3)
    dx = layers.maxpool2d_backward(dout, cache)
    assert dx.shape == x.shape and not dx[0, 0, 4].any()
    for r in range(2):
        for s in range(3):
            window = dx[0, 0, 2 * r:2 * r + 2, 2 * s:2 * s + 2]
            assert np.count_nonzero(window) == 1 and window.sum() == dout[0, 0, r, s]
            assert x[0, 0, 2 * r:2 * r + 2, 2 * s:2 * s + 2][window != 0] == out[0, 0, r, s]


def test_maxpool2d_sends_a_tied_windows_gradient_to_exactly_one_entry():
    x = np.zeros((2, 3, 4, 4))
    x[0, 0, 0, 1] = x[0, 0, 1, 0] = 1.0  # two tied maxima in one window, and all-zero windows elsewhere
    out, cache = layers.maxpool2d_forward(x, 2)
    dx = layers.maxpool2d_backward(np.ones_like(out), cache)
    assert dx.sum() == out.size
    windows = dx.reshape(2, 3, 2, 2, 2, 2)
    assert (np.count_nonzero(windows, axis=(3, 5)) == 1).all()
    assert dx[0, 0, 0, 1] == 1.0 and dx[0, 0, 1, 0] == 0.0


def test_maxpool2d_keeps_channels_last_memory_order():
    x = np.random.default_rng(10).standard_normal((2, 4, 4, 3)).transpose(0, 3, 1, 2)
    out, cache = layers.maxpool2d_forward(x, 2)
    assert np.moveaxis(out, 1, -1).flags.c_contiguous
    np.testing.assert_array_equal(out, x.reshape(2, 3, 2, 2, 2, 2).max(axis=(3, 5)))


def test_batchnorm_on_images_normalizes_each_channel_over_batch_height_and_width():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 3, 5, 6)) * np.array([1.0, 2.0, 3.0])[:, None, None] - 2
    state = _bn_state(3)
    out, _ = layers.batchnorm_forward(x, np.ones(3), np.zeros(3), state, True, eps=0)
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(out.std(axis=(0, 2, 3)), 1, rtol=1e-12)
    np.testing.assert_allclose(state["mean"], 0.1 * x.mean(axis=(0, 2, 3)), rtol=1e-12)
