"""Weight initialization: Xavier/Glorot, He and small random normal weights drawn from an explicit Generator."""
import math

import numpy as np

INIT_KINDS = ("he", "xavier", "small")
# Model fields each kind reads besides the shape (only "small" has a scale of its own).
INIT_READS = {"he": (), "xavier": (), "small": ("init_scale",)}


def _normal(shape, std, rng, dtype):
    """Normal(0, std^2) samples of the given float32 or float64 dtype."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"init: dtype must be float32 or float64, got {dtype}")
    w = rng.standard_normal(shape, dtype=dtype)
    w *= dtype.type(std)
    return w


def xavier(fan_in, fan_out, rng, dtype=np.float32, shape=None):
    """Glorot normal: std sqrt(2 / (fan_in + fan_out)); shape defaults to (fan_in, fan_out)."""
    return _normal(shape or (fan_in, fan_out), math.sqrt(2.0 / (fan_in + fan_out)), rng, dtype)


def he(fan_in, fan_out, rng, dtype=np.float32, shape=None):
    """He normal for ReLU networks: std sqrt(2 / fan_in); shape defaults to (fan_in, fan_out)."""
    return _normal(shape or (fan_in, fan_out), math.sqrt(2.0 / fan_in), rng, dtype)


def small_random(shape, rng, scale=0.01, dtype=np.float32):
    """Normal weights with std `scale`."""
    return _normal(shape, scale, rng, dtype)


def init_weight(kind, shape, fan_in, fan_out, rng, scale=0.01, dtype=np.float32):
    """A weight array of `shape` initialized by kind "he", "xavier" or "small" (std `scale`)."""
    if kind == "he":
        return he(fan_in, fan_out, rng, dtype, shape)
    if kind == "xavier":
        return xavier(fan_in, fan_out, rng, dtype, shape)
    if kind == "small":
        return small_random(shape, rng, scale, dtype)
    raise ValueError(f"init: unknown kind {kind!r} (known: {', '.join(INIT_KINDS)})")
