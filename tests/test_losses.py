"""Tests for nncore.losses: closed forms, numerical stability and gradients against finite differences."""
import math

import numpy as np
import pytest

from nncore.gradcheck import eval_numerical_gradient, rel_error
from nncore.losses import l2_penalty, softmax, softmax_loss, svm_loss

LOSSES = [softmax_loss, svm_loss]


def _svm_scores(rng, n=6, c=5):
    """Scores whose pairwise differences are multiples of 0.37 (+-0.01): every margin s_j - s_y + 1 is at
    least ~0.1 away from the hinge."""
    return 0.37 * rng.permutation(n * c).reshape(n, c) + rng.uniform(-0.01, 0.01, (n, c))


def test_softmax_loss_matches_the_definition():
    rng = np.random.default_rng(0)
    scores, y = rng.standard_normal((5, 4)), np.array([0, 3, 1, 1, 2])
    probs = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    loss, dscores = softmax_loss(scores, y)
    assert isinstance(loss, float)
    assert loss == pytest.approx(-np.mean(np.log(probs[np.arange(5), y])), rel=1e-14)
    onehot = np.eye(4)[y]
    np.testing.assert_allclose(dscores, (probs - onehot) / 5, rtol=1e-12)


def test_softmax_loss_of_equal_scores_is_log_classes():
    loss, _ = softmax_loss(np.zeros((3, 10)), np.array([0, 4, 9]))
    assert loss == pytest.approx(math.log(10), rel=1e-15)


def test_svm_loss_matches_a_hand_computed_example():
    scores = np.array([[3.0, 1.0, 2.5], [0.0, 4.0, 4.5]])
    y = np.array([0, 1])
    # sample 0: margins 1 - 3 + 1 = -1 -> 0, 2.5 - 3 + 1 = 0.5; sample 1: 0 - 4 + 1 = -3 -> 0, 4.5 - 4 + 1 = 1.5
    loss, dscores = svm_loss(scores, y)
    assert loss == pytest.approx((0.5 + 1.5) / 2)
    assert dscores.tolist() == [[-0.5, 0.0, 0.5], [0.0, -0.5, 0.5]]
    assert svm_loss(scores, y, delta=0.0)[0] == pytest.approx((0.0 + 0.5) / 2)


@pytest.mark.parametrize("loss_fn", LOSSES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_huge_logits_give_finite_loss_and_gradient(loss_fn, dtype, scale):
    scores = np.array([[scale, 0.0, -scale], [0.0, scale, 1.0], [1.0, 2.0, 3.0]], dtype=dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, dscores = loss_fn(scores, np.array([2, 1, 0]))
    assert math.isfinite(loss) and np.all(np.isfinite(dscores))
    assert dscores.dtype == dtype


def test_softmax_loss_with_huge_logits_equals_the_margin():
    # a confident wrong prediction by 1e4 costs about 1e4 nats; a confident right one about 0.
    loss, _ = softmax_loss(np.array([[1e4, 0.0]], dtype=np.float32), np.array([1]))
    assert loss == pytest.approx(1e4)
    assert softmax_loss(np.array([[1e4, 0.0]]), np.array([0]))[0] == 0.0


@pytest.mark.parametrize("loss_fn, tol", [(softmax_loss, 1e-7), (svm_loss, 1e-5)])
def test_loss_gradients_match_finite_differences(loss_fn, tol):
    rng = np.random.default_rng(1)
    scores = _svm_scores(rng) if loss_fn is svm_loss else 2 * rng.standard_normal((6, 5))
    y = rng.integers(0, 5, 6)
    _, dscores = loss_fn(scores, y)
    numeric = eval_numerical_gradient(lambda s: loss_fn(s, y)[0], scores, h=1e-5)
    assert rel_error(dscores, numeric) < tol


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_losses_do_not_modify_their_input(loss_fn):
    scores = np.arange(6.0).reshape(2, 3)
    loss_fn(scores, np.array([0, 2]))
    assert scores.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


def test_softmax_probabilities_sum_to_one_and_keep_float32():
    scores = np.array([[1e4, 0.0, -1e4], [1.0, 2.0, 3.0]], dtype=np.float32)
    probs = softmax(scores)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(probs[1], np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum(), rtol=1e-6)


def test_l2_penalty_value_and_gradient():
    rng = np.random.default_rng(2)
    params = {"W1": rng.standard_normal((3, 4)), "b1": rng.standard_normal(4), "W2": rng.standard_normal((4, 2))}
    names = ["W1", "W2"]
    expected = 0.5 * 0.3 * (np.sum(params["W1"] ** 2) + np.sum(params["W2"] ** 2))
    assert l2_penalty(params, names, 0.3) == pytest.approx(expected, rel=1e-14)
    grads = {name: np.zeros_like(w) for name, w in params.items()}
    l2_penalty(params, names, 0.3, grads)
    for name in names:
        numeric = eval_numerical_gradient(lambda _: l2_penalty(params, names, 0.3), params[name])
        assert rel_error(grads[name], numeric) < 1e-7
    assert not grads["b1"].any()


def test_l2_penalty_off_leaves_gradients_alone():
    params = {"W1": np.ones((2, 2))}
    grads = {"W1": np.full((2, 2), 5.0)}
    assert l2_penalty(params, ["W1"], 0.0, grads) == 0.0
    assert grads["W1"].tolist() == [[5.0, 5.0], [5.0, 5.0]]


def test_l2_penalty_gradient_keeps_float32():
    params = {"W1": np.ones((2, 2), dtype=np.float32)}
    grads = {"W1": np.zeros((2, 2), dtype=np.float32)}
    assert l2_penalty(params, ["W1"], np.float64(0.5), grads) == pytest.approx(1.0)
    assert grads["W1"].dtype == np.float32 and grads["W1"].tolist() == [[0.5, 0.5], [0.5, 0.5]]
