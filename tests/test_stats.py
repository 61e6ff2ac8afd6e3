"""Babysitting statistics on constructed cases with known answers."""
import math
from types import SimpleNamespace

import numpy as np
import pytest

from nncore.model import layer_of
from nncore.stats import activation_stats, dead_relu_fraction, update_weight_ratios


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
