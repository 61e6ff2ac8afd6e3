"""Tests for nncore.model: config validation, construction, loss/inference semantics, dtypes and checkpoints."""
import json
import math
import re
import tracemalloc

import numpy as np
import pytest

from nncore.errors import ConfigError
from nncore.model import MODEL_DEFAULTS, Model, build_model, layer_of, validate_model_config

MLP = {"hidden": [6, 5]}
CONV = {"arch": "conv1d", "conv_channels": [3, 2], "conv_kernel": 3, "conv_pool": 2, "hidden": [4]}
CONV2D = {**CONV, "arch": "conv2d"}


def _data(input_shape, n=10, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n,) + input_shape).astype(np.float32), rng.integers(0, classes, n)


# --- validation ---------------------------------------------------------------------------------------

def test_defaults_are_valid_and_filled_in():
    assert validate_model_config({}) == MODEL_DEFAULTS
    assert validate_model_config(MODEL_DEFAULTS) == MODEL_DEFAULTS
    cfg = validate_model_config({"hidden": [3]})
    assert cfg["hidden"] == [3] and cfg["activation"] == "relu"
    cfg["conv_channels"].append(99)
    assert MODEL_DEFAULTS["conv_channels"] == [16]


def test_validation_normalizes_numpy_scalars_to_python_types():
    cfg = validate_model_config({"hidden": (np.int64(7),), "dropout": np.float64(0.25), "batchnorm": np.bool_(True),
                                 "conv_kernel": np.int32(3), "leaky_alpha": 0})
    assert cfg["hidden"] == [7] and type(cfg["hidden"][0]) is int
    assert type(cfg["dropout"]) is float and type(cfg["batchnorm"]) is bool and type(cfg["conv_kernel"]) is int
    assert type(cfg["leaky_alpha"]) is float
    json.dumps(cfg)


@pytest.mark.parametrize("cfg, message", [
    ({"hiden": [3]}, r"^model\.hiden: unknown field \(known: activation, arch, "),
    ({"arch": "rnn"}, r"^model\.arch: expected one of 'mlp', 'conv1d', 'conv2d', got 'rnn'"),
    ({"hidden": [0]}, r"^model\.hidden: expected a list of 0 to 64 ints in \[1, 65536\], got \[0\]"),
    ({"hidden": 128}, r"^model\.hidden: expected a list"),
    ({"hidden": [1.5]}, r"^model\.hidden: "),
    ({"hidden": [True]}, r"^model\.hidden: "),
    ({"hidden": [65537]}, r"^model\.hidden: .*65536"),
    ({"hidden": [8] * 65}, r"^model\.hidden: "),
    ({"activation": "swish"}, r"^model\.activation: expected one of 'relu', "),
    ({"activation": 1}, r"^model\.activation: "),
    ({"dropout": 1.0}, r"^model\.dropout: expected a number in \[0\.0, 1\.0\), got 1\.0"),
    ({"dropout": -0.1}, r"^model\.dropout: "),
    ({"dropout": float("nan")}, r"^model\.dropout: "),
    ({"dropout": "0.2"}, r"^model\.dropout: "),
    ({"dropout": True}, r"^model\.dropout: "),
    ({"batchnorm": 1}, r"^model\.batchnorm: expected true or false, got 1"),
    ({"init": "orthogonal"}, r"^model\.init: "),
    ({"init_scale": 0}, r"^model\.init_scale: "),
    ({"loss": "hinge"}, r"^model\.loss: "),
    ({"leaky_alpha": 1.0}, r"^model\.leaky_alpha: "),
    ({"elu_alpha": 0.0}, r"^model\.elu_alpha: "),
    ({"maxout_pieces": 1}, r"^model\.maxout_pieces: expected an int in \[2, 16\], got 1"),
    ({"conv_channels": []}, r"^model\.conv_channels: "),
    ({"conv_kernel": 0}, r"^model\.conv_kernel: "),
    ({"conv_pool": 2.0}, r"^model\.conv_pool: "),
    ({"hidden": [40000, 40000]}, r"^model\.hidden: 1,600,000,000 parameters between hidden layers alone exceed"),
])
def test_invalid_fields_are_refused_with_the_field_named(cfg, message):
    with pytest.raises(ConfigError, match=message):
        validate_model_config(cfg)


def test_a_non_mapping_config_is_refused():
    with pytest.raises(ConfigError, match=r"^model: expected a table of fields, got list"):
        validate_model_config([("hidden", [3])])


def test_absurd_sizes_are_refused_before_allocating():
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match=r"^model\.hidden: 3,000,\d{3},\d{3} parameters .* exceed"):
            build_model({"hidden": [30000]}, (100000,), 10, seed=0)
        with pytest.raises(ConfigError, match=r"^model\.conv_channels: .* parameters"):
            build_model({"arch": "conv1d", "conv_channels": [4096, 4096], "conv_kernel": 5, "conv_pool": 1,
                         "hidden": []}, (1, 8), 2, seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_conv_blocks_that_shrink_the_sequence_to_nothing_are_refused():
    with pytest.raises(ConfigError, match=r"^model\.conv_channels: conv block 3 shrinks the sequence to length 0"):
        build_model({**CONV, "conv_channels": [2, 2, 2]}, (1, 6), 2, seed=0)


def test_conv1d_needs_channels_and_length():
    with pytest.raises(ConfigError, match=r"^model\.arch: 'conv1d' needs per-sample inputs shaped"):
        build_model(CONV, (12,), 2, seed=0)


@pytest.mark.parametrize("input_shape", [(12,), (1, 12), (1, 2, 3, 4)])
def test_conv2d_needs_channels_height_and_width(input_shape):
    with pytest.raises(ConfigError, match=r"^model\.arch: 'conv2d' needs per-sample inputs shaped "
                                          r"\(channels, height, width\), got input shape"):
        build_model(CONV2D, input_shape, 2, seed=0)


@pytest.mark.parametrize("input_shape, block", [((1, 6, 6), 3), ((1, 16, 3), 2), ((1, 3, 16), 2)])
def test_conv2d_blocks_that_shrink_the_image_to_nothing_are_refused(input_shape, block):
    expected = rf"^model\.conv_channels: conv block {block} shrinks the image to size 0 \(input shape "
    with pytest.raises(ConfigError, match=expected + re.escape(str(input_shape))):
        build_model({**CONV2D, "conv_channels": [2, 2, 2]}, input_shape, 2, seed=0)


def test_conv2d_parameter_count_is_checked_before_allocating():
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match=r"^model\.conv_channels: .* parameters"):
            build_model({**CONV2D, "conv_channels": [2048, 2048], "conv_kernel": 5, "conv_pool": 1, "hidden": []},
                        (1, 8, 8), 2, seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_bad_shapes_and_class_counts_are_refused():
    with pytest.raises(ValueError, match="num_classes"):
        build_model(MLP, (4,), 1, seed=0)
    with pytest.raises(ValueError, match="input_shape"):
        build_model(MLP, (0,), 2, seed=0)


# --- construction -------------------------------------------------------------------------------------

def test_mlp_parameters_and_initialization():
    model = build_model({**MLP, "init": "small", "init_scale": 0.05}, (4,), 3, seed=0)
    shapes = {k: v.shape for k, v in model.params.items()}
    assert shapes == {"W1": (4, 6), "b1": (6,), "W2": (6, 5), "b2": (5,), "W3": (5, 3), "b3": (3,)}
    assert all(v.dtype == np.float32 for v in model.params.values())
    assert model.weight_names == ["W1", "W2", "W3"]
    assert model.layer_names == ["layer1", "layer2", "layer3"]
    assert model.buffers == {}
    assert not any(model.params[b].any() for b in ("b1", "b2", "b3"))
    assert 0.02 < float(np.std(model.params["W1"])) < 0.08


def test_batchnorm_layers_have_gamma_beta_and_running_stats_instead_of_a_bias():
    model = build_model({**MLP, "batchnorm": True}, (4,), 3, seed=0)
    assert list(model.params) == ["W1", "gamma1", "beta1", "W2", "gamma2", "beta2", "W3", "b3"]
    assert list(model.buffers) == ["bn1_mean", "bn1_var", "bn2_mean", "bn2_var"]
    assert model.params["gamma1"].tolist() == [1.0] * 6 and not model.params["beta1"].any()
    assert model.buffers["bn2_var"].tolist() == [1.0] * 5 and not model.buffers["bn2_mean"].any()


def test_maxout_weights_have_one_column_per_piece():
    model = build_model({**MLP, "activation": "maxout", "maxout_pieces": 3}, (4,), 3, seed=0)
    assert model.params["W1"].shape == (4, 18) and model.params["W2"].shape == (6, 15)
    assert model.params["W3"].shape == (5, 3)


def test_conv1d_parameters():
    model = build_model({**CONV, "batchnorm": True}, (2, 9), 3, seed=0)
    shapes = {k: v.shape for k, v in model.params.items()}
    # length 9 -> conv (pad 1) 9 -> pool 4 -> conv 4 -> pool 2; head input 2 channels * 2
    assert shapes == {"Wc1": (3, 2, 3), "gammac1": (3,), "betac1": (3,), "Wc2": (2, 3, 3), "gammac2": (2,),
                      "betac2": (2,), "W1": (4, 4), "gamma1": (4,), "beta1": (4,), "W2": (4, 3), "b2": (3,)}
    assert model.layer_names == ["conv1", "conv2", "layer1", "layer2"]
    assert model.weight_names == ["Wc1", "Wc2", "W1", "W2"]


def test_conv2d_parameters_and_fans():
    model = build_model({**CONV2D, "batchnorm": True, "conv_kernel": 5}, (2, 9, 7), 3, seed=0)
    shapes = {k: v.shape for k, v in model.params.items()}
    # 9x7 -> conv (pad 2) 9x7 -> pool 4x3 -> conv 4x3 -> pool 2x1; head input 2 channels * 2 * 1
    assert shapes == {"Wc1": (3, 2, 5, 5), "gammac1": (3,), "betac1": (3,), "Wc2": (2, 3, 5, 5), "gammac2": (2,),
                      "betac2": (2,), "W1": (4, 4), "gamma1": (4,), "beta1": (4,), "W2": (4, 3), "b2": (3,)}
    assert list(model.buffers) == ["bnc1_mean", "bnc1_var", "bnc2_mean", "bnc2_var", "bn1_mean", "bn1_var"]
    assert model.layer_names == ["conv1", "conv2", "layer1", "layer2"]
    assert model.weight_names == ["Wc1", "Wc2", "W1", "W2"]
    wide = build_model({**CONV2D, "conv_channels": [64], "conv_kernel": 3}, (16, 12, 12), 3, seed=0)
    # He: std sqrt(2 / fan_in) with fan_in = C * KH * KW = 144
    assert float(np.std(wide.params["Wc1"])) == pytest.approx(math.sqrt(2 / 144), rel=0.05)
    xavier = build_model({**CONV2D, "conv_channels": [64], "conv_kernel": 3, "init": "xavier"}, (16, 12, 12), 3,
                         seed=0)
    assert float(np.std(xavier.params["Wc1"])) == pytest.approx(math.sqrt(2 / (144 + 576)), rel=0.05)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "elu", "tanh", "sigmoid", "maxout"])
def test_conv2d_forward_is_conv_activation_pool_then_the_head(activation):
    """The model pools before the activation; that equals the textbook activate-then-pool exactly."""
    from nncore import layers
    from nncore.model import _activation
    cfg = {**CONV2D, "conv_channels": [3], "hidden": [], "activation": activation}
    model = build_model(cfg, (2, 6, 4), 3, seed=0)
    for name, p in model.params.items():
        p[...] = np.random.default_rng(len(name)).standard_normal(p.shape)
    x, _ = _data((2, 6, 4), n=5)
    h, _ = layers.conv2d_forward(x, model.params["Wc1"], model.params["bc1"], pad=1)
    h, _ = _activation(model.config)[0](h)
    h, _ = layers.maxpool2d_forward(h, 2)
    expected = h.reshape(5, -1) @ model.params["W1"] + model.params["b1"]
    np.testing.assert_array_equal(model.activations(x)["conv1"], h)
    np.testing.assert_allclose(model.scores(x), expected, rtol=1e-6, atol=1e-6)


def test_the_seed_determines_the_weights():
    a, b, c = (build_model(MLP, (4,), 3, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.params["W1"], b.params["W1"])
    assert not np.array_equal(a.params["W1"], c.params["W1"])


@pytest.mark.parametrize("name, layer", [("W1", "layer1"), ("b12", "layer12"), ("gamma2", "layer2"),
                                         ("beta3", "layer3"), ("bn1_mean", "layer1"), ("Wc1", "conv1"),
                                         ("bc2", "conv2"), ("gammac1", "conv1"), ("betac4", "conv4"),
                                         ("bnc2_var", "conv2")])
def test_layer_of_groups_params_and_buffers(name, layer):
    assert layer_of(name) == layer == Model.layer_of(name)


@pytest.mark.parametrize("name", ["W", "x1", "W1_mean", "Wd1", "ema.W1"])
def test_layer_of_refuses_other_names(name):
    with pytest.raises(ValueError, match="not a model parameter"):
        layer_of(name)


def test_model_refuses_params_that_do_not_fit_the_config():
    model = build_model(MLP, (4,), 3, seed=0)
    params = dict(model.params, W1=np.zeros((5, 6), np.float32))
    with pytest.raises(ValueError, match=r"params\['W1'\]: expected shape \(4, 6\)"):
        Model(model.config, (4,), 3, params, {})
    with pytest.raises(ValueError, match="expected arrays"):
        Model(model.config, (4,), 3, {k: v for k, v in model.params.items() if k != "b2"}, {})
    with pytest.raises(ValueError, match="one float dtype"):
        Model(model.config, (4,), 3, dict(model.params, b1=model.params["b1"].astype(np.float64)), {})


# --- loss and inference -------------------------------------------------------------------------------

VARIANTS = {
    **{act: {**MLP, "activation": act} for act in ["relu", "leaky_relu", "elu", "tanh", "sigmoid", "maxout"]},
    "bn+dropout": {**MLP, "batchnorm": True, "dropout": 0.5},
    "svm": {**MLP, "loss": "svm"},
    "conv1d": CONV,
    "conv1d+bn+maxout": {**CONV, "batchnorm": True, "activation": "maxout"},
    "conv2d": CONV2D,
    "conv2d+bn+maxout+dropout": {**CONV2D, "batchnorm": True, "activation": "maxout", "dropout": 0.3},
}


def _input_shape(cfg):
    return {"conv1d": (2, 9), "conv2d": (2, 5, 6)}.get(cfg.get("arch"), (4,))


@pytest.mark.parametrize("name", VARIANTS)
def test_float32_models_stay_float32(name):
    cfg = {**VARIANTS[name], "dropout": np.float64(VARIANTS[name].get("dropout", 0.0))}
    model = build_model(cfg, _input_shape(cfg), 3, seed=0)
    x, y = _data(_input_shape(cfg))
    loss, grads = model.loss(x, y, reg=np.float64(0.1), rng=np.random.default_rng(0))
    assert isinstance(loss, float) and math.isfinite(loss)
    assert list(grads) == list(model.params)
    for k, g in grads.items():
        assert g.dtype == np.float32 and g.shape == model.params[k].shape, k
    assert model.scores(x).dtype == np.float32
    assert model.predict_proba(x).dtype == np.float32
    assert all(a.dtype == np.float32 for a in model.activations(x).values())
    assert all(b.dtype == np.float32 for b in model.buffers.values())


@pytest.mark.parametrize("name", VARIANTS)
def test_float32_and_float64_losses_agree(name):
    cfg = VARIANTS[name]
    model = build_model(cfg, _input_shape(cfg), 3, seed=0)
    x, y = _data(_input_shape(cfg))
    wide = model.astype(np.float64)
    masks = wide.sample_dropout_masks(len(x), np.random.default_rng(5))  # float64 masks serve both
    loss32, grads32 = model.loss(x, y, reg=0.01, dropout_masks=masks)
    loss64, grads64 = wide.loss(x.astype(np.float64), y, reg=0.01, dropout_masks=masks)
    assert loss32 == pytest.approx(loss64, rel=1e-5)
    for k in grads32:
        np.testing.assert_allclose(grads32[k], grads64[k], rtol=1e-3, atol=1e-5 * np.abs(grads64[k]).max())


def test_small_init_gives_initial_softmax_loss_of_log_classes():
    model = build_model({**MLP, "init": "small", "init_scale": 1e-3}, (4,), 7, seed=0)
    x, y = _data((4,), n=200, classes=7)
    assert model.loss(x, y, train=False)[0] == pytest.approx(math.log(7), rel=1e-4)


def test_regularization_adds_half_reg_sum_of_squared_weights_and_reg_w_to_their_gradients():
    model = build_model({**MLP, "batchnorm": True}, (4,), 3, seed=0).astype(np.float64)
    x, y = _data((4,))
    plain, g0 = model.loss(x, y, reg=0.0, train=False)
    reg, g1 = model.loss(x, y, reg=0.3, train=False)
    squares = sum(float(np.sum(model.params[k] ** 2)) for k in ("W1", "W2", "W3"))
    assert reg - plain == pytest.approx(0.15 * squares, rel=1e-12)
    for k in model.params:
        expected = g0[k] + 0.3 * model.params[k] if k.startswith("W") else g0[k]
        np.testing.assert_allclose(g1[k], expected, rtol=1e-12, atol=1e-15)


def test_dropout_needs_randomness_in_train_mode_only():
    model = build_model({**MLP, "dropout": 0.5}, (4,), 3, seed=0)
    x, y = _data((4,))
    with pytest.raises(ValueError, match="needs rng or dropout_masks"):
        model.loss(x, y)
    assert model.loss(x, y, train=False)[0] == model.loss(x, y, train=False)[0]
    a = model.loss(x, y, rng=np.random.default_rng(1))[0]
    b = model.loss(x, y, rng=np.random.default_rng(2))[0]
    assert a != b
    with pytest.raises(ValueError, match="only with train=True"):
        model.loss(x, y, train=False, dropout_masks={})


def test_given_dropout_masks_reproduce_the_rng_draw():
    model = build_model({**MLP, "dropout": 0.3}, (4,), 3, seed=0)
    x, y = _data((4,))
    masks = model.sample_dropout_masks(len(x), np.random.default_rng(9))
    assert {k: m.shape for k, m in masks.items()} == {"layer1": (10, 6), "layer2": (10, 5)}
    with_masks, g1 = model.loss(x, y, dropout_masks=masks)
    with_rng, g2 = model.loss(x, y, rng=np.random.default_rng(9))
    assert with_masks == with_rng
    np.testing.assert_array_equal(g1["W1"], g2["W1"])
    zeroed = {k: np.zeros_like(m) for k, m in masks.items()}
    _, g3 = model.loss(x, y, dropout_masks=zeroed)
    assert not g3["W1"].any() and not g3["W2"].any()


def test_no_dropout_means_no_masks():
    model = build_model(MLP, (4,), 3, seed=0)
    assert model.sample_dropout_masks(5, np.random.default_rng(0)) == {}
    x, y = _data((4,))
    assert model.loss(x, y)[0] == model.loss(x, y, train=False)[0]


def test_batchnorm_running_stats_move_in_train_mode_only():
    model = build_model({**MLP, "batchnorm": True}, (4,), 3, seed=0)
    x, y = _data((4,), n=50)
    x = 3 * x + 2
    model.loss(x, y, train=False)
    model.scores(x)
    model.activations(x)
    assert not model.buffers["bn1_mean"].any()
    for _ in range(100):
        model.loss(x, y)
    z = x @ model.params["W1"]
    np.testing.assert_allclose(model.buffers["bn1_mean"], z.mean(axis=0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model.buffers["bn1_var"], z.var(axis=0), rtol=1e-3)
    # with converged running stats, test mode normalizes like train mode on the same batch
    np.testing.assert_allclose(model.loss(x, y, train=False)[0], model.loss(x, y)[0], rtol=1e-3)


def test_scores_can_use_other_parameters():
    model = build_model(MLP, (4,), 3, seed=0)
    x, _ = _data((4,))
    other = {k: v.copy() for k, v in model.params.items()}
    other["W3"][...] = 0
    other["b3"][...] = [1.0, 2.0, 3.0]
    np.testing.assert_array_equal(model.scores(x, params=other), np.tile([1.0, 2.0, 3.0], (10, 1)))
    probs = model.predict_proba(x, params=other)
    np.testing.assert_allclose(probs[0], np.exp([1, 2, 3]) / np.exp([1, 2, 3]).sum(), rtol=1e-6)
    assert not np.array_equal(model.scores(x), model.scores(x, params=other))


def test_predict_proba_is_the_softmax_of_the_scores():
    model = build_model(CONV, (2, 9), 3, seed=0)
    x, _ = _data((2, 9))
    probs = model.predict_proba(x)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(probs.argmax(axis=1), model.scores(x).argmax(axis=1))


def test_activations_are_the_post_nonlinearity_outputs_per_hidden_layer():
    model = build_model(CONV, (2, 9), 3, seed=0)
    x, _ = _data((2, 9))
    acts = model.activations(x)
    # conv blocks report their activations after pooling
    assert {k: a.shape for k, a in acts.items()} == {"conv1": (10, 3, 4), "conv2": (10, 2, 2), "layer1": (10, 4)}
    assert all((a >= 0).all() for a in acts.values())
    mlp = build_model({**MLP, "activation": "tanh"}, (4,), 3, seed=0)
    x, _ = _data((4,))
    np.testing.assert_allclose(mlp.activations(x)["layer1"], np.tanh(x @ mlp.params["W1"] + mlp.params["b1"]),
                               rtol=1e-6)


def test_inputs_of_the_wrong_shape_are_refused():
    model = build_model(MLP, (4,), 3, seed=0)
    with pytest.raises(ValueError, match=r"expects inputs shaped \(N, 4\)"):
        model.scores(np.zeros((2, 5)))


def test_inputs_are_converted_to_the_model_dtype():
    model = build_model(MLP, (4,), 3, seed=0)
    x, y = _data((4,))
    loss64, _ = model.loss(x.astype(np.float64), y)
    assert loss64 == model.loss(x, y)[0]


def test_astype_copies():
    model = build_model({**MLP, "batchnorm": True}, (4,), 3, seed=0)
    wide = model.astype(np.float64)
    assert wide.dtype == np.float64 and all(b.dtype == np.float64 for b in wide.buffers.values())
    wide.params["W1"][...] = 0
    wide.buffers["bn1_var"][...] = 5
    assert model.params["W1"].any() and model.buffers["bn1_var"][0] == 1
    assert wide.config == model.config and wide.input_shape == model.input_shape
