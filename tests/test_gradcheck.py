"""Tests for nncore.gradcheck: the error measure, finite differences against closed forms, and whole-model
gradients of every architecture, activation and loss, with regularization on and off."""
import numpy as np
import pytest

from nncore.gradcheck import check_model_gradients, eval_numerical_gradient, rel_error
from nncore.model import Model, build_model

SMOOTH, KINKED = 1e-6, 1e-5


def test_rel_error_scales_by_the_largest_entry():
    assert rel_error([1.0, -2.0], [1.0, -2.0]) == 0.0
    assert rel_error([0.0, 0.0], [0.0, 0.0]) == 0.0
    assert rel_error([4.0, 1.0], [4.0, 1.2]) == pytest.approx(0.05)
    assert rel_error([0.0], [3.0]) == 1.0
    assert rel_error([2.0, 1e-3], [2.0, 2e-3]) == pytest.approx(5e-4)  # a wrong small entry still shows
    assert rel_error([1.0, 2.0], [1.5, 2.0]) == rel_error([1.5, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="shapes differ"):
        rel_error(np.zeros(2), np.zeros(3))


def test_numerical_gradient_of_a_scalar_function_matches_the_closed_form():
    x = np.linspace(-2, 2, 12).reshape(3, 4)
    before = x.copy()
    numeric = eval_numerical_gradient(lambda v: np.sum(np.sin(v) * v), x)
    np.testing.assert_allclose(numeric, np.cos(x) * x + np.sin(x), rtol=1e-8, atol=1e-9)
    np.testing.assert_array_equal(x, before)


def test_numerical_gradient_of_an_array_function_contracts_with_dout():
    rng = np.random.default_rng(0)
    x, w, dout = rng.standard_normal((3, 4)), rng.standard_normal((4, 2)), rng.standard_normal((3, 2))
    numeric = eval_numerical_gradient(lambda v: v @ w, x, h=1e-5, dout=dout)
    assert rel_error(numeric, dout @ w.T) < 1e-9


def test_numerical_gradient_refuses_float32():
    with pytest.raises(TypeError, match="float64"):
        eval_numerical_gradient(np.sum, np.ones(3, dtype=np.float32))


MODELS = {
    **{act: ({"hidden": [7, 5], "activation": act}, (6,))
       for act in ["relu", "leaky_relu", "elu", "tanh", "sigmoid", "maxout"]},
    **{f"{act}+bn+dropout": ({"hidden": [7, 5], "activation": act, "batchnorm": True, "dropout": 0.3}, (6,))
       for act in ["relu", "leaky_relu", "elu", "tanh", "sigmoid", "maxout"]},
    "svm": ({"hidden": [7, 5], "loss": "svm"}, (6,)),
    "linear": ({"hidden": []}, (6,)),
    "conv1d": ({"arch": "conv1d", "conv_channels": [3, 2], "conv_kernel": 3, "conv_pool": 2, "hidden": [5]}, (2, 9)),
    "conv1d+tanh+bn+dropout": ({"arch": "conv1d", "conv_channels": [3], "conv_kernel": 4, "conv_pool": 1,
                                "hidden": [5], "activation": "tanh", "batchnorm": True, "dropout": 0.2}, (2, 9)),
    "conv1d+maxout": ({"arch": "conv1d", "conv_channels": [3], "conv_kernel": 3, "conv_pool": 3, "hidden": [4],
                       "activation": "maxout"}, (2, 9)),
    "conv2d": ({"arch": "conv2d", "conv_channels": [3, 2], "conv_kernel": 3, "conv_pool": 2, "hidden": [5]},
               (2, 5, 6)),
    "conv2d+tanh+bn+dropout": ({"arch": "conv2d", "conv_channels": [3], "conv_kernel": 3, "conv_pool": 1,
                                "hidden": [4], "activation": "tanh", "batchnorm": True, "dropout": 0.2}, (2, 4, 3)),
    "conv2d+sigmoid+bn+pool": ({"arch": "conv2d", "conv_channels": [2], "conv_kernel": 2, "conv_pool": 2,
                                "hidden": [], "activation": "sigmoid", "batchnorm": True}, (1, 5, 4)),
    "conv2d+maxout": ({"arch": "conv2d", "conv_channels": [2], "conv_kernel": 3, "conv_pool": 2, "hidden": [3],
                       "activation": "maxout"}, (2, 4, 4)),
}


def _kinked(cfg):
    """ReLU-like activations, maxout, max pooling and the hinge loss have kinks: the looser tolerance."""
    return (cfg.get("activation", "relu") in ("relu", "leaky_relu", "maxout") or cfg.get("loss") == "svm"
            or (cfg.get("arch") in ("conv1d", "conv2d") and cfg.get("conv_pool", 2) > 1))


def _model_and_data(cfg, input_shape, seed):
    """A 4-class model whose biases, gammas and betas are random too (zero biases put ReLU pre-activations
    exactly on the kink when a unit's inputs are all zero; unit gammas would hide a gamma missing from a
    formula), and 8 samples covering every class."""
    rng = np.random.default_rng(seed)
    model = build_model(cfg, input_shape, 4, seed=seed)
    for name, p in model.params.items():
        if name.startswith("gamma"):
            p[...] = rng.uniform(0.5, 1.5, p.shape)
        elif not name.startswith("W"):
            p[...] = rng.normal(0.0, 0.5, p.shape)
    return model, rng.standard_normal((8,) + input_shape), np.arange(8) % 4


@pytest.mark.parametrize("reg", [0.0, 0.1])
@pytest.mark.parametrize("name", MODELS)
def test_model_gradients_match_finite_differences(name, reg):
    cfg, input_shape = MODELS[name]
    model, x, y = _model_and_data(cfg, input_shape, seed=0)
    errors = check_model_gradients(model, x, y, reg)
    assert set(errors) == set(model.params)
    assert max(errors.values()) < (KINKED if _kinked(cfg) else SMOOTH), errors


def test_check_model_gradients_catches_a_wrong_gradient():
    class OffByOnePermille(Model):
        def loss(self, x, y, **kw):
            loss, grads = super().loss(x, y, **kw)
            grads["b1"][0] *= 1.001
            return loss, grads

    model, x, y = _model_and_data({"hidden": [5], "activation": "tanh"}, (3,), seed=0)
    bad = OffByOnePermille(model.config, model.input_shape, model.num_classes, model.params, model.buffers)
    errors = check_model_gradients(bad, x, y, 0.0)
    assert errors["b1"] > 1e-5
    assert max(v for k, v in errors.items() if k != "b1") < SMOOTH


def test_check_model_gradients_leaves_the_model_alone():
    model, x, y = _model_and_data({"hidden": [4], "batchnorm": True, "dropout": 0.5}, (3,), seed=1)
    params = {k: v.copy() for k, v in model.params.items()}
    buffers = {k: v.copy() for k, v in model.buffers.items()}
    check_model_gradients(model, x, y, 0.1)
    for k in params:
        np.testing.assert_array_equal(model.params[k], params[k])
        assert model.params[k].dtype == np.float32
    for k in buffers:
        np.testing.assert_array_equal(model.buffers[k], buffers[k])


def test_rel_error_floor_bounds_the_scale_from_below():
    assert rel_error([1e-12], [3e-12], floor=1e-3) == pytest.approx(2e-9)
    assert rel_error([2.0], [1.0], floor=1e-3) == 0.5


def test_a_vanishing_true_gradient_is_not_reported_as_an_error():
    # One input channel, kernel 1 and batchnorm: each conv filter is a scale that batchnorm divides out,
    # so dL/dWc1 is zero but for batchnorm's eps (1e-5 against a variance of ~1).
    cfg = {"arch": "conv1d", "conv_channels": [2], "conv_kernel": 1, "conv_pool": 1, "hidden": [3],
           "batchnorm": True, "activation": "tanh"}
    model, x, y = _model_and_data(cfg, (1, 6), seed=0)
    _, grads = model.astype(np.float64).loss(x.astype(np.float64), y)
    assert np.abs(grads["Wc1"]).max() < 1e-6
    errors = check_model_gradients(model, x, y, 0.0)
    assert max(errors.values()) < SMOOTH, errors
