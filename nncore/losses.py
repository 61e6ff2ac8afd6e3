"""Classification losses (softmax cross-entropy, multiclass SVM) with their gradients, and L2 regularization."""
import numpy as np


def _shifted_exp(scores):
    """(exp(scores - rowmax), rowmax): the max shift keeps exp from overflowing for any logits."""
    rowmax = scores.max(axis=1, keepdims=True)
    e = scores - rowmax
    np.exp(e, out=e)
    return e, rowmax


def softmax(scores):
    """Row-wise softmax probabilities of scores (N, C)."""
    e, _ = _shifted_exp(scores)
    e /= e.sum(axis=1, keepdims=True)
    return e


def softmax_loss(scores, y):
    """Mean cross-entropy of softmax(scores) against integer labels y; returns (loss, dscores).

    The loss is log-sum-exp minus the correct logit, both taken after the max shift, so it stays
    finite for logits of any size.
    """
    n = len(scores)
    rows = np.arange(n)
    e, rowmax = _shifted_exp(scores)
    sums = e.sum(axis=1, keepdims=True)
    correct = scores[rows, y] - rowmax[:, 0]
    loss = (float(np.log(sums).sum()) - float(correct.sum())) / n
    sums *= n
    e /= sums
    e[rows, y] -= e.dtype.type(1 / n)
    return loss, e


def svm_loss(scores, y, delta=1.0):
    """Mean multiclass hinge loss sum_{j != y} max(0, s_j - s_y + delta); returns (loss, dscores)."""
    n = len(scores)
    rows = np.arange(n)
    margins = scores - scores[rows, y][:, None]
    margins += delta
    np.maximum(margins, 0, out=margins)
    margins[rows, y] = 0
    loss = float(margins.sum()) / n
    dscores = (margins > 0).astype(scores.dtype)
    dscores[rows, y] = -dscores.sum(axis=1)
    dscores *= dscores.dtype.type(1 / n)
    return loss, dscores


def l2_penalty(params, names, reg, grads=None):
    """0.5 * reg * sum of squares of params[name] for name in names; adds reg * w into grads[name] if given."""
    if reg == 0:
        return 0.0
    total = 0.0
    for name in names:
        w = params[name]
        total += float(np.vdot(w, w))
        if grads is not None:
            grads[name] += w.dtype.type(reg) * w
    return 0.5 * reg * total
