"""Sanity checks on the digits data set, and that each check catches what it is meant to catch."""
import math

import pytest

from nncore import sanity
from nncore.data import load_dataset
from nncore.model import build_model

SOLVER = {"update": "adam", "lr": 1e-2}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0, preprocess="standardize")


@pytest.mark.parametrize("model_cfg, expected", [
    ({"hidden": [64]}, math.log(10)),
    ({"hidden": [64, 32], "batchnorm": True, "dropout": 0.5}, math.log(10)),
    ({"hidden": [64], "loss": "svm"}, 9.0),
])
def test_initial_loss_near_chance_with_small_weights(digits, model_cfg, expected):
    model = build_model(model_cfg, digits.input_shape, digits.num_classes, seed=0)
    loss, exp, ok = sanity.initial_loss_check(model, digits)
    assert exp == pytest.approx(expected)
    assert ok and abs(loss - expected) < 0.05 * expected


def test_initial_loss_check_catches_a_wrong_loss(digits, monkeypatch):
    class Summed:  # a loss that sums over the batch instead of averaging
        def __init__(self, model):
            self.model = model

        def loss(self, x, y, **kw):
            loss, grads = self.model.loss(x, y, **kw)
            return loss * len(x), grads

    real_build = sanity.build_model
    monkeypatch.setattr(sanity, "build_model", lambda *a, **kw: Summed(real_build(*a, **kw)))
    model = build_model({"hidden": [32]}, digits.input_shape, digits.num_classes, seed=0)
    assert sanity.initial_loss_check(model, digits)[2] is False


def test_regularization_raises_loss(digits):
    model = build_model({"hidden": [32]}, digits.input_shape, digits.num_classes, seed=0)
    plain, regularized, ok = sanity.regularization_check(model, digits)
    assert ok and regularized > plain


def test_regularization_check_catches_ignored_reg(digits):
    class IgnoresReg:
        def __init__(self, model):
            self.model = model

        def loss(self, x, y, *, reg=0.0, **kw):
            return self.model.loss(x, y, reg=0.0, **kw)

    model = build_model({"hidden": [32]}, digits.input_shape, digits.num_classes, seed=0)
    assert sanity.regularization_check(IgnoresReg(model), digits)[2] is False


def test_overfit_twenty_examples(digits):
    acc, epoch, ok = sanity.overfit_check({"hidden": [64], "dropout": 0.3}, SOLVER, digits, n=20)
    assert ok and acc == 1.0 and 1 <= epoch < 200


def test_overfit_check_fails_when_lr_is_too_small(digits):
    acc, _, ok = sanity.overfit_check({"hidden": [64]}, {"update": "sgd", "lr": 1e-7}, digits, n=20, epochs=3)
    assert not ok and acc < 1.0


def test_run_sanity_checks_reports_all_three(digits):
    results = sanity.run_sanity_checks({"hidden": [64]}, SOLVER, digits)
    assert [r.name for r in results] == ["initial_loss", "regularization", "overfit"]
    assert all(r.ok for r in results), results
    assert results[0].value == pytest.approx(math.log(10), rel=0.05)
    assert results[2].value == 1.0 and "at epoch" in results[2].message
