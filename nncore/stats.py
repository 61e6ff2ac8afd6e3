"""Babysitting statistics: update/weight ratios, activation and gradient histograms, dead-unit fractions per layer."""
import math

import numpy as np

from nncore.model import layer_of

HISTOGRAM_BINS = 30


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


def _summaries(activations):
    """{layer: {"mean", "std", "dead_fraction"}} of activations as returned by Model.activations."""
    dead = dead_relu_fraction(activations)
    return {layer: {"mean": float(np.mean(act, dtype=np.float64)),
                    "std": float(np.std(act, dtype=np.float64)),
                    "dead_fraction": dead[layer]}
            for layer, act in activations.items()}


def activation_stats(model, x):
    """{layer: {"mean", "std", "dead_fraction"}} of the model's hidden activations on x (test mode)."""
    return _summaries(model.activations(x))


def histogram(values, bins=HISTOGRAM_BINS):
    """{"counts": `bins` ints, "edges": bins + 1 floats} of the finite entries of `values` over their observed
    range (a constant array gets the range value +- 0.5, an array without finite entries 0..1), plus
    "nonfinite": how many entries were NaN or infinite. JSON-safe."""
    flat = np.asarray(values).ravel()
    finite = flat[np.isfinite(flat)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(finite, bins=bins, range=(lo, hi))
    return {"counts": counts.tolist(), "edges": edges.astype(np.float64).tolist(),
            "nonfinite": int(flat.size - finite.size)}


def babysit_stats(model, x, y, bins=HISTOGRAM_BINS):
    """Babysitting snapshot of `model` on the fixed batch (x, y), bounded in size and JSON-safe.

    "activations": {layer: histogram of the post-nonlinearity activations + "mean", "std", "dead_fraction"}
    for every conv block and hidden layer; "gradients": {layer: histogram of the weight gradients + "norm"}
    for every layer's weights (data loss only); "loss": that data loss. Computed in test mode (no dropout,
    running batchnorm statistics), so taking a snapshot changes nothing in the model.
    """
    activations = model.activations(x)
    out = {"activations": {}, "gradients": {}}
    for layer, summary in _summaries(activations).items():
        out["activations"][layer] = {**histogram(activations[layer], bins), **summary}
    loss, grads = model.loss(x, y, reg=0.0, train=False)
    for name in model.weight_names:
        grad = grads[name]
        norm = math.sqrt(_sq_norm(grad.astype(np.float64, copy=False)))
        out["gradients"][layer_of(name)] = {**histogram(grad, bins), "norm": norm if math.isfinite(norm) else None}
    out["loss"] = float(loss) if math.isfinite(loss) else None
    return out
