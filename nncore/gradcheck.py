"""Gradient checking: centered finite differences in float64 compared with analytic gradients."""
import numpy as np


def rel_error(a, n, *, floor=0.0):
    """max|a - n| / max(max|a|, max|n|, floor): the largest deviation relative to the largest gradient entry
    (0 when the denominator is 0).

    Scaling by the largest entry rather than entry by entry keeps exact zeros of the true gradient (a class
    whose hinge terms cancel, a maxout piece that never wins) and entries below the finite-difference noise
    from reporting a relative error of 1; a wrong entry of any size that matters still shows. `floor` does
    the same for an array whose true gradient is zero everywhere (see check_model_gradients).
    """
    a = np.asarray(a, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    if a.shape != n.shape:
        raise ValueError(f"rel_error: shapes differ, {a.shape} vs {n.shape}")
    scale = max(np.max(np.abs(a), initial=0.0), np.max(np.abs(n), initial=0.0), floor)
    return 0.0 if scale == 0 else float(np.max(np.abs(a - n)) / scale)


def eval_numerical_gradient(f, x, h=1e-6, dout=None):
    """Gradient w.r.t. the float64 array x of the scalar f(x), or of sum(f(x) * dout) for an array-valued f,
    by centered differences (f(x+h) - f(x-h)) / 2h.

    With dout the difference is taken entry by entry before the sum, so unchanged outputs cancel exactly
    and rounding noise stays small. x is perturbed in place one entry at a time and restored, so f may
    also read x through other references.
    """
    if x.dtype != np.float64:
        raise TypeError(f"eval_numerical_gradient needs a float64 array, got {x.dtype}")
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + h
        plus = f(x)
        x[idx] = old - h
        minus = f(x)
        x[idx] = old
        diff = plus - minus if dout is None else np.sum((plus - minus) * dout)
        grad[idx] = diff / (2 * h)
    return grad


def check_model_gradients(model, x, y, reg, *, h=1e-6, seed=0):
    """{param: rel_error(analytic, numerical)} for every parameter of a float64 copy of the model.

    The loss is taken in train mode (batch statistics) with dropout masks drawn once from `seed` and
    held fixed, so the loss is a deterministic function of the parameters.

    Differences of a loss L resolve gradients only down to ~eps * |L| / h (~2e-10 * |L| at h = 1e-6), so
    errors are scaled by at least 1e7 times that (~2e-3 * |L|): a parameter whose true gradient vanishes
    (weights that batchnorm makes scale-invariant, hinge terms that cancel) then reports ~1e-7 instead of
    noise / noise ~ 1, and a parameter with only tiny gradients is still held to a deviation of ~tol * 2e-3 * |L|.
    h = 1e-6 balances that noise against the h^2 truncation error of strongly curved losses (small batches
    through batchnorm).
    """
    model = model.astype(np.float64)
    x = np.asarray(x, dtype=np.float64)
    masks = model.sample_dropout_masks(len(x), np.random.default_rng(seed))

    def loss(_):
        return model.loss(x, y, reg=reg, dropout_masks=masks)[0]

    value, grads = model.loss(x, y, reg=reg, dropout_masks=masks)
    floor = 1e7 * np.finfo(np.float64).eps * max(1.0, abs(value)) / h
    return {name: rel_error(grads[name], eval_numerical_gradient(loss, w, h), floor=floor)
            for name, w in model.params.items()}
