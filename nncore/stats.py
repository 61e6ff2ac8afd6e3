"""Babysitting statistics: update/weight ratios, activation mean/std and dead-unit fractions per layer."""
import math

import numpy as np

from nncore.model import layer_of


def _sq_norm(a):
    flat = a.ravel()
    return float(np.dot(flat, flat))


def update_weight_ratios(before, after, names):
    """{layer: ||after - before|| / ||before||} over the parameters `names`, grouped with layer_of.

    A healthy learning rate gives ratios around 1e-3 per update. A layer whose weights were all zero
    reports 0.0 when unchanged and inf when it moved.
    """
    delta_sq, weight_sq = {}, {}
    for name in names:
        layer = layer_of(name)
        old = before[name]
        delta_sq[layer] = delta_sq.get(layer, 0.0) + _sq_norm(after[name] - old)
        weight_sq[layer] = weight_sq.get(layer, 0.0) + _sq_norm(old)
    ratios = {}
    for layer, dsq in delta_sq.items():
        if weight_sq[layer] > 0.0:
            ratios[layer] = math.sqrt(dsq / weight_sq[layer])
        else:
            ratios[layer] = 0.0 if dsq == 0.0 else math.inf
    return ratios


def dead_relu_fraction(activations):
    """{layer: fraction of units (features of one sample) that are exactly zero for every sample}.

    `activations` maps layer names to arrays of shape (N, ...) as returned by Model.activations.
    """
    out = {}
    for layer, act in activations.items():
        alive = np.any(act.reshape(len(act), -1) != 0, axis=0)
        out[layer] = 1.0 - float(np.mean(alive))
    return out


def activation_stats(model, x):
    """{layer: {"mean", "std", "dead_fraction"}} of the model's hidden activations on x (test mode)."""
    activations = model.activations(x)
    dead = dead_relu_fraction(activations)
    return {layer: {"mean": float(np.mean(act, dtype=np.float64)),
                    "std": float(np.std(act, dtype=np.float64)),
                    "dead_fraction": dead[layer]}
            for layer, act in activations.items()}
