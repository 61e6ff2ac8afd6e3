"""Layers as pure forward/backward pairs: `X_forward(...) -> (out, cache)`, `X_backward(dout, cache) -> grads`.

Every function keeps the dtype of its input (float32 in, float32 out; float64 for gradient checks).
Backward functions return `dx` alone for layers without parameters and `(dx, dparam, ...)` otherwise.
"""
import math

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
    db = np.ones(len(dout), dtype=dout.dtype) @ dout if has_bias else None  # GEMV: ~4x np.sum(axis=0)
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


def _window_index(axes, offsets, ndim):
    """Index of one window position in a grouped array: axis a of the input becomes (groups, size) there."""
    index, pos = [], dict(zip(axes, offsets))
    for axis in range(ndim):
        index += [slice(None), pos[axis]] if axis in pos else [slice(None)]
    return tuple(index)


def _group_max_forward(x, axes, size):
    """Maximum over consecutive groups of `size` entries along each of `axes` (windows of size ** len(axes)
    entries); a trailing remainder along an axis is dropped.

    No argmax: the maxima come from len(window) - 1 elementwise np.maximum passes over strided views, and
    the cache holds a boolean mask of the window maxima (the first in window order wins a tie, so each
    window routes its gradient to exactly one entry). The outputs keep the memory order of x (a channels-last
    view stays channels-last).
    """
    groups = {axis: x.shape[axis] // size for axis in axes}
    for axis, count in groups.items():
        if count < 1:
            raise ValueError(f"axis {axis} of length {x.shape[axis]} is shorter than the group size {size}")
    used = x[tuple(slice(0, groups[a] * size) if a in groups else slice(None) for a in range(x.ndim))]
    grouped_shape, expanded_shape = [], []
    for axis, length in enumerate(x.shape):
        grouped_shape += [groups[axis], size] if axis in groups else [length]
        expanded_shape += [groups[axis], 1] if axis in groups else [length]
    grouped = used.reshape(grouped_shape)
    positions = [_window_index(axes, offsets, x.ndim) for offsets in np.ndindex(*(size,) * len(axes))]
    out = grouped[positions[0]].copy(order="K")
    for position in positions[1:]:
        np.maximum(out, grouped[position], out=out)
    mask = grouped == out.reshape(expanded_shape)
    if np.count_nonzero(mask) > out.size:  # ties: keep the first maximum of each window only
        taken = np.zeros(out.shape, dtype=bool)
        for position in positions:
            winner = mask[position]
            winner &= ~taken
            taken |= winner
    return out, (mask, out, x.shape, used.shape, tuple(expanded_shape))


def _like(template, values):
    """A copy of `values` in the memory order of `template` (same shape and dtype)."""
    out = np.empty_like(template)
    out[...] = values
    return out


def _group_max_backward(dout, cache):
    """Route each output gradient to the entry that was the maximum of its group.

    dout is first brought into the forward output's memory order (a copy of a pool-th of the input's size)
    when it differs, so the full-size product with the mask runs over matching layouts.
    """
    mask, out, shape, used_shape, expanded_shape = cache
    if dout.strides != out.strides:
        dout = _like(out, dout)
    dused = np.multiply(mask, dout.reshape(expanded_shape), dtype=dout.dtype).reshape(used_shape)
    if used_shape == shape:
        return dused
    dx = np.zeros(shape, dtype=dout.dtype)
    dx[tuple(slice(0, n) for n in used_shape)] = dused
    return dx


def max_pieces_forward(z, pieces):
    """Maxout nonlinearity: (N, H * pieces, ...) -> (N, H, ...), max over consecutive groups of `pieces` channels."""
    if z.shape[1] % pieces:
        raise ValueError(f"max_pieces: {z.shape[1]} channels do not split into groups of {pieces}")
    return _group_max_forward(z, (1,), pieces)


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
    """Batch normalization per channel (axis 1) of x shaped (N, D), (N, C, L) or (N, C, H, W) (spatial).

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


def _conv_forward(x, w, b, stride, pad):
    """N-d convolution (cross-correlation) as one GEMM over im2col columns.

    x (N, C, *size), w (F, C, *kernel) -> (N, F, *out) with out = (size + 2 * pad - kernel) // stride + 1.
    The columns are gathered with sliding_window_view from a zero-padded copy of x (a view when pad is 0) in
    whichever order copies the longer contiguous runs: channels-last, each output position's (kernel...,
    C) patch a row (runs of kernel[-1] * C values: wide layers), or channels-first, each (C, kernel...)
    entry a row over all positions (runs of a whole output row, for stride 1: the first layer of an image
    net, C = 3). The result is a channels-first view of the GEMM's channels-last (N·out, F) output: no
    transpose copy, and layers after it keep that memory order.
    """
    n, c, *size = x.shape
    f, _, *kernel = w.shape
    out_size = [(length + 2 * pad - k) // stride + 1 for length, k in zip(size, kernel)]
    if min(out_size) < 1:
        raise ValueError(f"conv: input size {tuple(size)} with pad {pad} is shorter than the kernel {tuple(kernel)}")
    dims = len(size)
    channels_last = kernel[-1] * c >= (out_size[-1] if stride == 1 else 1)
    xs = np.moveaxis(x, 1, -1) if channels_last else x
    spatial = tuple(range(1, dims + 1)) if channels_last else tuple(range(2, dims + 2))
    if pad:
        padded = [length + 2 * pad for length in size]
        xp = np.zeros((n, *padded, c) if channels_last else (n, c, *padded), dtype=x.dtype)
        region = [slice(None)] * (dims + 2)
        for axis in spatial:
            region[axis] = slice(pad, -pad)
        xp[tuple(region)] = xs
    else:
        xp = xs
    windows = sliding_window_view(xp, kernel, axis=spatial)
    windows = windows[tuple(slice(None, None, stride) if axis in spatial else slice(None)
                            for axis in range(dims + 2))]
    kernel_axes = tuple(range(dims + 2, 2 * dims + 2))
    if channels_last:  # (N, *out, C, *kernel) -> rows (N, *out), columns (*kernel, C)
        cols = windows.transpose((0, *spatial, *kernel_axes, dims + 1)).reshape(n * math.prod(out_size), -1)
        wcols = np.moveaxis(w, 1, -1).reshape(f, -1).T
    else:  # (N, C, *out, *kernel) -> columns (C, *kernel), rows (N, *out), gathered as its transpose
        cols = np.ascontiguousarray(windows.transpose((1, *kernel_axes, 0, *spatial))).reshape(c * math.prod(kernel),
                                                                                             -1).T
        wcols = w.reshape(f, -1).T
    out, affine_cache = affine_forward(cols, wcols, b)
    out = np.moveaxis(out.reshape(n, *out_size, f), -1, 1)
    return out, (affine_cache, w, channels_last, x.shape, stride, pad)


def _conv_backward(dout, cache, input_grad=True):
    """(dx, dw, db) of _conv_forward; dx (a channels-first view of channels-last memory) is None when
    input_grad is False, db None without bias.

    The input gradient is one GEMM per kernel offset, dout (N·out, F) @ w[:, :, offset] (F, C), each added to
    the padded gradient at its shifted window: contiguous (N·out, C) blocks added row by row, where one GEMM
    into (N·out, kernel·C) columns leaves nine strided adds of C values each (col2im), 1.7x slower in all.
    """
    affine_cache, w, channels_last, (n, c, *size), stride, pad = cache
    f, *out_size = dout.shape[1:]
    kernel = w.shape[2:]
    dout_rows = np.moveaxis(dout, 1, -1).reshape(-1, f)
    _, dw, db = affine_backward(dout_rows, affine_cache, input_grad=False)
    dw = np.ascontiguousarray(np.moveaxis(dw.T.reshape(f, *kernel, c), -1, 1)) if channels_last else \
        dw.T.reshape(w.shape)
    if not input_grad:
        return None, dw, db
    wl = np.ascontiguousarray(np.moveaxis(w, 1, -1))  # (F, *kernel, C)
    dxp = np.zeros((n, *(length + 2 * pad for length in size), c), dtype=dout.dtype)
    shifted = np.empty((len(dout_rows), c), dtype=dout.dtype)
    for offsets in np.ndindex(*kernel):
        np.matmul(dout_rows, wl[(slice(None),) + offsets], out=shifted)
        region = tuple(slice(o, o + stride * (m - 1) + 1, stride) for o, m in zip(offsets, out_size))
        dxp[(slice(None),) + region] += shifted.reshape(n, *out_size, c)
    dx = dxp[(slice(None),) + tuple(slice(pad, pad + length) for length in size)]
    return np.moveaxis(dx, -1, 1), dw, db


def conv1d_forward(x, w, b=None, stride=1, pad=0):
    """1-D convolution (cross-correlation): x (N, C, L), w (F, C, K), b (F,) or None -> (N, F, L_out).

    L_out = (L + 2 * pad - K) // stride + 1; zero padding on both ends.
    """
    return _conv_forward(x, w, b, stride, pad)


def conv1d_backward(dout, cache, input_grad=True):
    """(dx, dw, db); dx is None when input_grad is False, db None without bias."""
    return _conv_backward(dout, cache, input_grad)


def conv2d_forward(x, w, b=None, stride=1, pad=0):
    """2-D convolution (cross-correlation): x (N, C, H, W), w (F, C, KH, KW), b (F,) or None
    -> (N, F, H_out, W_out).

    H_out = (H + 2 * pad - KH) // stride + 1 (W_out likewise); zero padding on all four sides.
    """
    return _conv_forward(x, w, b, stride, pad)


def conv2d_backward(dout, cache, input_grad=True):
    """(dx, dw, db); dx is None when input_grad is False, db None without bias."""
    return _conv_backward(dout, cache, input_grad)


def maxpool1d_forward(x, pool):
    """Non-overlapping max pooling over the last axis of x (N, C, L) -> (N, C, L // pool)."""
    return _group_max_forward(x, (2,), pool)


def maxpool1d_backward(dout, cache):
    """dx: each window's output gradient goes to its (first) maximum."""
    return _group_max_backward(dout, cache)


def maxpool2d_forward(x, pool):
    """Non-overlapping pool x pool max pooling of x (N, C, H, W) -> (N, C, H // pool, W // pool)."""
    return _group_max_forward(x, (2, 3), pool)


def maxpool2d_backward(dout, cache):
    """dx: each window's output gradient goes to its (first) maximum."""
    return _group_max_backward(dout, cache)
