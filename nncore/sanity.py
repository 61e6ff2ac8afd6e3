"""Pre-training sanity checks: initial loss near chance, regularization raises the loss, a tiny subset is overfit."""
import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from nncore.model import build_model
from nncore.solver import Solver

_TOLERANCE = 0.05  # relative distance of the initial loss from its expected value
_CHECK_REG = 1.0  # regularization strength of regularization_check
_OVERFIT_EPOCHS = 200


@dataclass(frozen=True)
class SanityResult:
    """Outcome of one check: its name, whether it passed, the measured value and a readable message."""

    name: str
    ok: bool
    value: float
    message: str


def _dtype(model):
    return next(iter(model.params.values())).dtype


def initial_loss_check(model, data, *, n=1000):
    """Loss of the model's architecture with small weights on up to n training samples.

    Returns (loss, expected, ok): expected is ln(C) for softmax and C - 1 for the SVM loss (delta 1),
    ok when the loss is within 5% of it.
    """
    small = build_model({**model.config, "init": "small"}, model.input_shape, model.num_classes, seed=0,
                        dtype=_dtype(model))
    loss, _ = small.loss(data.x_train[:n], data.y_train[:n], reg=0.0, train=False)
    c = model.num_classes
    expected = math.log(c) if model.config["loss"] == "softmax" else float(c - 1)
    return float(loss), expected, abs(loss - expected) <= _TOLERANCE * expected


def regularization_check(model, data, *, reg=_CHECK_REG, n=1000):
    """Returns (loss without reg, loss with reg, ok) on up to n training samples; ok when reg raises the loss."""
    x, y = data.x_train[:n], data.y_train[:n]
    plain, _ = model.loss(x, y, reg=0.0, train=False)
    regularized, _ = model.loss(x, y, reg=reg, train=False)
    return float(plain), float(regularized), regularized > plain


def overfit_check(model_cfg, solver_cfg, data, n=20, *, epochs=_OVERFIT_EPOCHS, seed=0):
    """Train a fresh model on n training samples (reg 0, full batch) until 100% training accuracy.

    Returns (best training accuracy, epoch it was first reached, ok).
    """
    idx = np.sort(np.random.default_rng(seed).choice(len(data.x_train), size=min(n, len(data.x_train)),
                                                     replace=False))
    x, y = data.x_train[idx], data.y_train[idx]
    tiny = SimpleNamespace(x_train=x, y_train=y, x_val=x, y_val=y)
    model = build_model(model_cfg, data.input_shape, data.num_classes, seed=seed)
    best = {"acc": 0.0, "epoch": 0}

    def record(metrics):
        if metrics["train_acc"] > best["acc"]:
            best.update(acc=metrics["train_acc"], epoch=metrics["epoch"])

    cfg = {**solver_cfg, "reg": 0.0, "batch_size": len(idx), "epochs": epochs, "train_eval_samples": len(idx),
           "val_points": 1}
    Solver(model, tiny, cfg, seed=seed, callback=record, should_stop=lambda: best["acc"] == 1.0).train()
    return best["acc"], best["epoch"], best["acc"] == 1.0


def run_sanity_checks(model_cfg, solver_cfg, data, *, seed=0, n=20):
    """Run the three checks on a model built from model_cfg; returns one SanityResult per check."""
    model = build_model(model_cfg, data.input_shape, data.num_classes, seed=seed)
    loss, expected, ok = initial_loss_check(model, data)
    results = [SanityResult("initial_loss", ok, loss,
                            f"initial loss {loss:.4g} with small weights, expected {expected:.4g} (within 5%)")]
    plain, regularized, ok = regularization_check(model, data)
    results.append(SanityResult("regularization", ok, regularized,
                                f"loss {plain:.4g} without regularization, {regularized:.4g} with reg={_CHECK_REG:g}"))
    acc, epoch, ok = overfit_check(model_cfg, solver_cfg, data, n, seed=seed)
    where = f"at epoch {epoch}" if ok else f"within {_OVERFIT_EPOCHS} epochs"
    results.append(SanityResult("overfit", ok, acc, f"training accuracy {acc:.3f} on {n} samples {where}"))
    return results
