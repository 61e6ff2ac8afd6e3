"""First-order update rules that step a parameter in place from its gradient and per-parameter state.

Every rule is `rule(w, dw, state, config, scratch=None)`: it updates w and state in place, leaves dw
as it was, and computes its temporaries in `scratch` (an array shaped like w that the caller reuses
across steps, so a training step allocates nothing) or, without one, in a new array.
"""
import math

import numpy as np

# Hyperparameters an update rule reads from its config when the key is absent.
DEFAULTS = {"lr": 1e-2, "momentum": 0.9, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "decay_rate": 0.99}


def _hyper(config, *keys):
    """Read hyperparameters as Python floats (keeps float32 arithmetic float32 under NumPy 2)."""
    return [float(config.get(key, DEFAULTS[key])) for key in keys]


def _slot(state, key, w, dtype=None):
    """Return state[key], creating it as zeros shaped like w on first use."""
    arr = state.get(key)
    if arr is None:
        arr = state[key] = np.zeros_like(w, dtype=dtype)
    return arr


def _scratch(w, scratch):
    """The buffer a rule computes its temporaries in: the caller's (shaped like w), else a new one."""
    return np.empty_like(w) if scratch is None else scratch


def sgd(w, dw, state, config, scratch=None):
    """Vanilla SGD: w -= lr * dw."""
    (lr,) = _hyper(config, "lr")
    step = np.multiply(dw, lr, out=_scratch(w, scratch))
    w -= step
    return w, state


def momentum(w, dw, state, config, scratch=None):
    """SGD with momentum: v = mu*v - lr*dw; w += v."""
    lr, mu = _hyper(config, "lr", "momentum")
    v = _slot(state, "v", w)
    v *= mu
    v -= np.multiply(dw, lr, out=_scratch(w, scratch))
    w += v
    return w, state


def nesterov(w, dw, state, config, scratch=None):
    """Nesterov momentum (cs231n form): v = mu*v - lr*dw; w += mu*v - lr*dw."""
    lr, mu = _hyper(config, "lr", "momentum")
    v = _slot(state, "v", w)
    step = np.multiply(dw, lr, out=_scratch(w, scratch))
    v *= mu
    v -= step
    w -= step
    w += np.multiply(v, mu, out=step)
    return w, state


def adagrad(w, dw, state, config, scratch=None):
    """Adagrad: cache += dw^2; w -= lr * dw / (sqrt(cache) + eps)."""
    lr, eps = _hyper(config, "lr", "eps")
    cache = _slot(state, "cache", w)
    tmp = _scratch(w, scratch)
    cache += np.multiply(dw, dw, out=tmp)
    _scaled_step(w, dw, cache, lr, eps, tmp)
    return w, state


def rmsprop(w, dw, state, config, scratch=None):
    """RMSprop: cache = d*cache + (1-d)*dw^2; w -= lr * dw / (sqrt(cache) + eps)."""
    lr, decay, eps = _hyper(config, "lr", "decay_rate", "eps")
    cache = _slot(state, "cache", w)
    tmp = np.multiply(dw, dw, out=_scratch(w, scratch))
    tmp *= 1.0 - decay
    cache *= decay
    cache += tmp
    _scaled_step(w, dw, cache, lr, eps, tmp)
    return w, state


def _scaled_step(w, dw, cache, lr, eps, tmp):
    """w -= lr * dw / (sqrt(cache) + eps), computed in tmp."""
    denom = np.sqrt(cache, out=tmp)
    denom += eps
    np.divide(dw, denom, out=denom)
    denom *= lr
    w -= denom


def adam(w, dw, state, config, scratch=None):
    """Adam with bias correction: w -= lr * m_hat / (sqrt(v_hat) + eps); state m, v and step count t."""
    lr, beta1, beta2, eps = _hyper(config, "lr", "beta1", "beta2", "eps")
    m = _slot(state, "m", w)
    v = _slot(state, "v", w)
    t = state.get("t")
    if t is None:
        t = state["t"] = np.zeros((), dtype=np.int64)
    t += 1
    steps = int(t)
    tmp = _scratch(w, scratch)
    m *= beta1
    m += np.multiply(dw, 1.0 - beta1, out=tmp)
    v *= beta2
    np.multiply(dw, dw, out=tmp)
    tmp *= 1.0 - beta2
    v += tmp
    denom = np.sqrt(v, out=tmp)
    denom *= 1.0 / math.sqrt(1.0 - beta2**steps)
    denom += eps
    np.divide(m, denom, out=denom)
    denom *= lr / (1.0 - beta1**steps)
    w -= denom
    return w, state


UPDATES = {
    "sgd": sgd,
    "momentum": momentum,
    "nesterov": nesterov,
    "adagrad": adagrad,
    "rmsprop": rmsprop,
    "adam": adam,
}
# Hyperparameters each update rule reads (solver fields; the one source of what applies to which rule).
READS = {
    "sgd": ("lr",),
    "momentum": ("lr", "momentum"),
    "nesterov": ("lr", "momentum"),
    "adagrad": ("lr", "eps"),
    "rmsprop": ("lr", "decay_rate", "eps"),
    "adam": ("lr", "beta1", "beta2", "eps"),
}


def clip_gradients(grads, max_norm):
    """Scale every gradient in place so their global L2 norm is at most max_norm (<= 0: off); return the norm before."""
    norm = math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
    if 0.0 < max_norm < norm:
        scale = float(max_norm) / norm
        for g in grads.values():
            g *= scale
    return norm
