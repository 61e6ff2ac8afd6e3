"""Layers as pure forward/backward pairs: `X_forward(...) -> (out, cache)`, `X_backward(dout, cache) -> grads`.

Every function keeps the dtype of its input (float32 in, float32 out; float64 for gradient checks).
Backward functions return `dx` alone for layers without parameters and `(dx, dparam, ...)` otherwise.
"""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

BN_MOMENTUM = 0.9
BN_EPS = 1e-5


def _flat(x):
    """(N, ...) -> (N, D) without copying 2-D inputs."""
    return x if x.ndim == 2 else x.reshape(len(x), -1)


def affine_forward(x, w, b=None):
    """out = x.reshape(N, D) @ w + b for x of shape (N, ...), w (D, H), b (H,) or None (no bias)."""
    out = _flat(x) @ w
    if b is not None:
        out += b
    return out, (x, w, b is not None)


def affine_backward(dout, cache, input_grad=True):
    """(dx, dw, db); dx is None when input_grad is False (the first layer needs no input gradient),
    db is None for a layer without bias."""
    x, w, has_bias = cache
    dw = _flat(x).T @ dout
    db = dout.sum(axis=0) if has_bias else None
    dx = (dout @ w.T).reshape(x.shape) if input_grad else None
    return dx, dw, db


def relu_forward(x, out=None):
    """max(x, 0); pass out=x to work in place on a buffer the caller owns."""
    out = np.maximum(x, 0, out=out)
    return out, out


def relu_backward(dout, cache, out=None):
    """dout where the forward output was positive, else 0; out=dout masks in place.

    A multiply by the boolean mask is branch-free (np.copyto(..., where=) is ~15x slower on random masks).
    """
    return np.multiply(dout, cache > 0, out=out)


def leaky_relu_forward(x, alpha=0.01):
    """x where x > 0, alpha * x elsewhere."""
    alpha = x.dtype.type(alpha)
    return np.where(x > 0, x, alpha * x), (x, alpha)


def leaky_relu_backward(dout, cache):
    x, alpha = cache
    return np.where(x > 0, dout, alpha * dout)


def elu_forward(x, alpha=1.0):
    """x where x > 0, alpha * (exp(x) - 1) elsewhere."""
    alpha = x.dtype.type(alpha)
    positive = x > 0
    out = np.where(positive, x, alpha * np.expm1(np.minimum(x, 0)))
    return out, (positive, out, alpha)


def elu_backward(dout, cache):
    positive, out, alpha = cache
    return np.where(positive, dout, dout * (out + alpha))


def tanh_forward(x):
    out = np.tanh(x)
    return out, out


def tanh_backward(dout, cache):
    return dout * (1 - cache * cache)


def sigmoid_forward(x):
    """1 / (1 + exp(-x)) computed as exp(-log(1 + exp(-x))), accurate and overflow-free for any x."""
    out = np.logaddexp(0, -x)
    np.negative(out, out=out)
    np.exp(out, out=out)
    return out, out


def sigmoid_backward(dout, cache):
    return dout * cache * (1 - cache)


def _group_max_forward(x, axis, size):
    """Maximum over consecutive groups of `size` entries along `axis`; a trailing remainder is dropped."""
    groups = x.shape[axis] // size
    if groups < 1:
        raise ValueError(f"axis {axis} of length {x.shape[axis]} is shorter than the group size {size}")
    used = x[(slice(None),) * axis + (slice(0, groups * size),)]
    grouped = used.reshape(x.shape[:axis] + (groups, size) + x.shape[axis + 1:])
    idx = np.expand_dims(grouped.argmax(axis=axis + 1), axis + 1)
    out = np.take_along_axis(grouped, idx, axis=axis + 1).squeeze(axis + 1)
    return out, (idx, x.shape, axis, size)


def _group_max_backward(dout, cache):
    """Route each output gradient to the entry that was the maximum of its group."""
    idx, shape, axis, size = cache
    groups = shape[axis] // size
    dgrouped = np.zeros(shape[:axis] + (groups, size) + shape[axis + 1:], dtype=dout.dtype)
    np.put_along_axis(dgrouped, idx, np.expand_dims(dout, axis + 1), axis=axis + 1)
    dused = dgrouped.reshape(shape[:axis] + (groups * size,) + shape[axis + 1:])
    if groups * size == shape[axis]:
        return dused
    dx = np.zeros(shape, dtype=dout.dtype)
    dx[(slice(None),) * axis + (slice(0, groups * size),)] = dused
    return dx


def max_pieces_forward(z, pieces):
    """Maxout nonlinearity: (N, H * pieces, ...) -> (N, H, ...), max over consecutive groups of `pieces` channels."""
    if z.shape[1] % pieces:
        raise ValueError(f"max_pieces: {z.shape[1]} channels do not split into groups of {pieces}")
    return _group_max_forward(z, 1, pieces)


def max_pieces_backward(dout, cache):
    return _group_max_backward(dout, cache)


def maxout_forward(x, w, b, pieces):
    """Maxout layer: affine to H * pieces units (w (D, H * pieces)), then max over each unit's pieces."""
    z, affine_cache = affine_forward(x, w, b)
    out, max_cache = max_pieces_forward(z, pieces)
    return out, (affine_cache, max_cache)


def maxout_backward(dout, cache, input_grad=True):
    """(dx, dw, db)."""
    affine_cache, max_cache = cache
    return affine_backward(max_pieces_backward(dout, max_cache), affine_cache, input_grad)


def dropout_mask(shape, p, rng, dtype=np.float32):
    """Inverted-dropout mask: 0 with probability p, 1 / (1 - p) otherwise, so E[mask] == 1."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p!r}")
    dtype = np.dtype(dtype)
    keep = rng.random(shape, dtype=dtype) >= p
    return keep * dtype.type(1 / (1 - p))


def dropout_forward(x, p, train, mask=None, rng=None):
    """Inverted dropout with drop probability p; identity in test mode or when p == 0.

    In train mode the mask comes from `mask` (fixed, e.g. for gradient checks; cast to x's dtype) or is
    drawn from `rng`.
    """
    if not train or p == 0:
        return x, None
    if mask is None:
        if rng is None:
            raise ValueError("dropout_forward: train=True with p > 0 needs a mask or an rng")
        mask = dropout_mask(x.shape, p, rng, x.dtype)
    mask = mask.astype(x.dtype, copy=False)
    return x * mask, mask


def dropout_backward(dout, cache):
    return dout if cache is None else dout * cache


def _channel_axes(x):
    """Axes batchnorm reduces over (all but the channel axis 1) and the broadcast shape of per-channel values."""
    return (0,) + tuple(range(2, x.ndim)), (1, x.shape[1]) + (1,) * (x.ndim - 2)


def batchnorm_forward(x, gamma, beta, bn_state, train, momentum=BN_MOMENTUM, eps=BN_EPS):
    """Batch normalization per channel (axis 1) of x shaped (N, D) or (N, C, L).

    train: normalize with batch statistics and update bn_state["mean"], bn_state["var"] in place
    (running = momentum * running + (1 - momentum) * batch); test: normalize with the running statistics
    (cast to x's dtype).
    """
    axes, shape = _channel_axes(x)
    if train:
        mean = x.mean(axis=axes)
        centered = x - mean.reshape(shape)
        var = np.square(centered).mean(axis=axes)
        for key, batch in (("mean", mean), ("var", var)):
            running = bn_state[key]
            running *= momentum
            running += (1 - momentum) * batch
    else:
        var = bn_state["var"].astype(x.dtype, copy=False)
        centered = x - bn_state["mean"].astype(x.dtype, copy=False).reshape(shape)
    inv_std = 1 / np.sqrt(var + eps)
    xhat = centered * inv_std.reshape(shape)
    out = xhat * gamma.reshape(shape)
    out += beta.reshape(shape)
    return out, (xhat, gamma, inv_std, train)


def batchnorm_backward(dout, cache):
    """(dx, dgamma, dbeta); in train mode dx accounts for the batch mean and variance depending on x."""
    xhat, gamma, inv_std, train = cache
    axes, shape = _channel_axes(dout)
    dbeta = dout.sum(axis=axes)
    dgamma = (dout * xhat).sum(axis=axes)
    scale = (gamma * inv_std).reshape(shape)
    if not train:
        return dout * scale, dgamma, dbeta
    count = dout.size // dout.shape[1]
    dx = dout - (dbeta / count).reshape(shape)
    dx -= xhat * (dgamma / count).reshape(shape)
    dx *= scale
    return dx, dgamma, dbeta


def conv1d_forward(x, w, b=None, stride=1, pad=0):
    """1-D convolution (cross-correlation) via im2col: x (N, C, L), w (F, C, K), b (F,) or None -> (N, F, L_out).

    L_out = (L + 2 * pad - K) // stride + 1; zero padding on both ends.
    """
    n, c, length = x.shape
    f, _, k = w.shape
    l_out = (length + 2 * pad - k) // stride + 1
    if l_out < 1:
        raise ValueError(f"conv1d: input length {length} with pad {pad} is shorter than the kernel {k}")
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad))) if pad else x
    windows = sliding_window_view(xp, k, axis=2)[:, :, ::stride]
    cols = windows.transpose(0, 2, 1, 3).reshape(n * l_out, c * k)
    out, affine_cache = affine_forward(cols, w.reshape(f, c * k).T, b)
    return out.reshape(n, l_out, f).transpose(0, 2, 1), (affine_cache, x.shape, stride, pad)


def conv1d_backward(dout, cache, input_grad=True):
    """(dx, dw, db); dx is None when input_grad is False, db None without bias."""
    affine_cache, (n, c, length), stride, pad = cache
    f, l_out = dout.shape[1:]
    dcols, dw, db = affine_backward(dout.transpose(0, 2, 1).reshape(n * l_out, f), affine_cache, input_grad)
    k = dw.shape[0] // c
    dw = dw.T.reshape(f, c, k)
    if not input_grad:
        return None, dw, db
    dcols = dcols.reshape(n, l_out, c, k)
    dxp = np.zeros((n, c, length + 2 * pad), dtype=dout.dtype)
    span = stride * (l_out - 1) + 1
    for j in range(k):
        dxp[:, :, j:j + span:stride] += dcols[:, :, :, j].transpose(0, 2, 1)
    return dxp[:, :, pad:pad + length], dw, db


def maxpool1d_forward(x, pool):
    """Non-overlapping max pooling over the last axis of x (N, C, L) -> (N, C, L // pool)."""
    return _group_max_forward(x, 2, pool)


def maxpool1d_backward(dout, cache):
    return _group_max_backward(dout, cache)
