"""Babysitting statistics on constructed cases with known answers."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from nncore.model import build_model, layer_of
from nncore.stats import (activation_stats, babysit_stats, dead_relu_fraction, histogram,
                          update_weight_ratios)


def test_update_weight_ratio_known_values():
    before = {"W1": np.ones((2, 2), dtype=np.float32),            # norm 2
              "W2": np.full((3,), 4.0, dtype=np.float32)}          # norm 4*sqrt(3)
    after = {"W1": before["W1"] + np.array([[0.12, 0.0], [0.0, -0.16]], dtype=np.float32),  # |delta| 0.2
             "W2": before["W2"].copy()}
    ratios = update_weight_ratios(before, after, ["W1", "W2"])
    assert ratios == {layer_of("W1"): pytest.approx(0.1), layer_of("W2"): 0.0}


def test_update_weight_ratio_groups_a_layers_params():
    assert layer_of("W1") == layer_of("b1")
    before = {"W1": np.array([3.0]), "b1": np.array([4.0])}                # layer norm 5
    after = {"W1": np.array([3.0 + 0.3]), "b1": np.array([4.0 - 0.4])}    # layer delta 0.5
    assert update_weight_ratios(before, after, ["W1", "b1"]) == {layer_of("W1"): pytest.approx(0.1)}
    # only the named parameters count
    assert update_weight_ratios(before, after, ["W1"]) == {layer_of("W1"): pytest.approx(0.1)}


def test_update_weight_ratio_zero_weights():
    zero = {"W1": np.zeros(3)}
    assert update_weight_ratios(zero, {"W1": np.zeros(3)}, ["W1"]) == {layer_of("W1"): 0.0}
    assert update_weight_ratios(zero, {"W1": np.ones(3)}, ["W1"]) == {layer_of("W1"): math.inf}


def test_dead_relu_fraction_counts_units_zero_on_every_sample():
    act = np.array([[0.0, 1.0, 0.0, 0.0],
                    [0.0, 0.0, 0.0, 2.0],
                    [0.0, 3.0, 0.0, 0.0]], dtype=np.float32)
    conv = np.zeros((2, 2, 3), dtype=np.float32)   # (N, C, L): 6 units per sample
    conv[1, 0, 2] = 1.0                            # one unit fires on one sample
    negative = -np.ones((4, 2))                    # tanh-like negatives are not "dead"
    assert dead_relu_fraction({"a": act, "c": conv, "t": negative}) == {
        "a": 0.5, "c": pytest.approx(5 / 6), "t": 0.0}


def test_activation_stats_mean_std_dead():
    acts = {"layer1": np.array([[0.0, 2.0], [0.0, 4.0]], dtype=np.float32),
            "layer2": np.array([[1.0, -1.0, 1.0, -1.0]], dtype=np.float32)}
    seen = []

    def activations(x):
        seen.append(x)
        return acts

    x = np.zeros((2, 3), dtype=np.float32)
    stats = activation_stats(SimpleNamespace(activations=activations), x)
    assert seen == [x]
    assert stats == {"layer1": {"mean": 1.5, "std": pytest.approx(math.sqrt(2.75)), "dead_fraction": 0.5},
                     "layer2": {"mean": 0.0, "std": 1.0, "dead_fraction": 0.0}}


def test_histogram_counts_finite_values_over_their_range():
    h = histogram(np.array([0.0, 1.0, 1.0, 3.0, np.nan, np.inf], dtype=np.float32), bins=3)
    assert h == {"counts": [1, 2, 1], "edges": [0.0, 1.0, 2.0, 3.0], "nonfinite": 2}
    assert all(type(c) is int for c in h["counts"]) and all(type(e) is float for e in h["edges"])
    assert histogram(np.full(5, 2.0), bins=2) == {"counts": [0, 5], "edges": [1.5, 2.0, 2.5], "nonfinite": 0}
    assert histogram(np.array([np.nan]), bins=2) == {"counts": [0, 0], "edges": [0.0, 0.5, 1.0], "nonfinite": 1}


def test_babysit_stats_are_bounded_json_safe_and_leave_the_model_alone():
    cfg = {"arch": "conv2d", "conv_channels": [3, 4], "conv_kernel": 3, "hidden": [6], "batchnorm": True,
           "dropout": 0.5}
    model = build_model(cfg, (1, 8, 8), 3, seed=0)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((20, 1, 8, 8)).astype(np.float32), rng.integers(0, 3, 20)
    params = {k: v.copy() for k, v in model.params.items()}
    buffers = {k: v.copy() for k, v in model.buffers.items()}
    stats = babysit_stats(model, x, y, bins=30)
    for name in params:
        np.testing.assert_array_equal(model.params[name], params[name])
    for name in buffers:
        np.testing.assert_array_equal(model.buffers[name], buffers[name])
    json.dumps(stats, allow_nan=False)
    acts = model.activations(x)
    assert list(stats["activations"]) == ["conv1", "conv2", "layer1"]
    for layer, entry in stats["activations"].items():
        assert len(entry["counts"]) == 30 and len(entry["edges"]) == 31
        assert sum(entry["counts"]) == acts[layer].size and entry["nonfinite"] == 0
        assert entry["edges"][0] == pytest.approx(float(acts[layer].min()))
        assert entry["edges"][-1] == pytest.approx(float(acts[layer].max()))
        assert entry["dead_fraction"] == dead_relu_fraction(acts)[layer]
        assert entry["mean"] == pytest.approx(float(acts[layer].mean()), rel=1e-5)
    loss, grads = model.loss(x, y, train=False)
    assert stats["loss"] == pytest.approx(loss)
    assert list(stats["gradients"]) == ["conv1", "conv2", "layer1", "layer2"]
    for name in model.weight_names:
        entry = stats["gradients"][layer_of(name)]
        assert sum(entry["counts"]) == model.params[name].size
        assert entry["norm"] == pytest.approx(float(np.linalg.norm(grads[name])), rel=1e-5) and entry["norm"] > 0
