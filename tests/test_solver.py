"""Solver: config validation, metrics, EMA, divergence and stop handling, exact resume."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from nncore.errors import ConfigError
from nncore.solver import (BABYSIT_SNAPSHOTS, LOSS_TRACE_POINTS, SOLVER_DEFAULTS, Solver, babysit_epochs,
                           loss_trace_every, validate_solver_config)


class LinearSoftmax:
    """Test-local Model: softmax regression with inverted input dropout that draws from the solver's rng."""

    def __init__(self, dim, classes, seed=0, dropout=0.0):
        rng = np.random.default_rng(seed)
        self.config = {"loss": "softmax"}
        self.input_shape, self.num_classes = (dim,), classes
        self.params = {"W1": (0.01 * rng.standard_normal((dim, classes))).astype(np.float32),
                       "b1": np.zeros(classes, dtype=np.float32)}
        self.buffers = {}
        self.weight_names = ["W1"]
        self.dropout = dropout
        self.calls = 0

    def scores(self, x, params=None):
        p = self.params if params is None else params
        return x @ p["W1"] + p["b1"]

    def activations(self, x):
        return {}  # no hidden layers

    def loss(self, x, y, *, reg=0.0, train=True, rng=None, dropout_masks=None):
        self.calls += train  # training steps only (babysitting snapshots take test-mode gradients)
        if train and self.dropout:
            x = x * (rng.random(x.shape) >= self.dropout) / np.float32(1 - self.dropout)
        s = self.scores(x)
        s = s - s.max(axis=1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=1, keepdims=True)
        n = len(x)
        loss = -np.log(p[np.arange(n), y]).mean() + 0.5 * reg * float(np.sum(self.params["W1"] ** 2))
        p[np.arange(n), y] -= 1
        p /= n
        return float(loss), {"W1": x.T @ p + reg * self.params["W1"], "b1": p.sum(axis=0)}


def blobs(n=300, dim=5, classes=3, seed=0):
    """Well-separated Gaussian blobs split 2:1 into train and val."""
    rng = np.random.default_rng(seed)
    centers = 3 * rng.standard_normal((classes, dim))
    y = rng.integers(0, classes, size=n)
    x = (centers[y] + rng.standard_normal((n, dim))).astype(np.float32)
    cut = 2 * n // 3
    return SimpleNamespace(x_train=x[:cut], y_train=y[:cut], x_val=x[cut:], y_val=y[cut:])


def make(config, *, seed=0, dropout=0.0, data=None, **kw):
    data = blobs() if data is None else data
    return Solver(LinearSoftmax(data.x_train.shape[1], 3, dropout=dropout), data, config, seed=seed, **kw)


# ----------------------------------------------------------------- config


def test_validate_fills_defaults_and_normalises_numbers():
    cfg = validate_solver_config({"lr": np.float32(0.5), "batch_size": np.int64(32), "epochs": 4.0})
    assert set(cfg) == set(SOLVER_DEFAULTS)
    assert cfg["lr"] == 0.5 and type(cfg["lr"]) is float
    assert cfg["batch_size"] == 32 and type(cfg["batch_size"]) is int
    assert cfg["epochs"] == 4 and type(cfg["epochs"]) is int
    assert validate_solver_config({}) == SOLVER_DEFAULTS


@pytest.mark.parametrize("field, value", [
    ("lr", 0.0), ("lr", -1e-3), ("lr", float("nan")), ("lr", "0.1"), ("momentum", 1.0), ("beta2", -0.1),
    ("batch_size", 0), ("batch_size", 12.5), ("batch_size", True), ("epochs", 0), ("update", "lbfgs"),
    ("lr_schedule", "linear"), ("ema_decay", 1.0), ("clip_norm", -1.0), ("abort_factor", 1.0),
    ("train_eval_samples", 0), ("val_points", 0), ("val_points", 101), ("lr_step", 0), ("reg", float("inf")), ("update", ["adam"]),
])
def test_validate_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"^solver\.{field}: "):
        validate_solver_config({field: value})


def test_validate_rejects_unknown_field():
    with pytest.raises(ConfigError, match=r"^solver\.learning_rate: unknown field \(known: update, lr, "):
        validate_solver_config({"learning_rate": 0.1})
    with pytest.raises(ConfigError, match=r"^solver: expected a table"):
        validate_solver_config([("lr", 0.1)])


# --------------------------------------------------------------- training


def test_trains_and_reports_json_safe_metrics_every_epoch():
    history = []
    solver = make({"update": "momentum", "lr": 0.1, "epochs": 3, "batch_size": 64,
                   "lr_schedule": "step", "lr_decay": 0.5}, callback=history.append)
    result = solver.train()
    assert result["status"] == "completed" and result["epoch"] == 3 == solver.epoch
    assert [m["epoch"] for m in history] == [1, 2, 3]
    assert [m["lr"] for m in history] == pytest.approx([0.1, 0.05, 0.025])
    keys = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "ema_val_acc", "lr", "update_ratio",
            "seconds", "samples_per_sec", "loss_trace", "babysit"}
    for m in history:
        assert set(m) == keys  # 3 epochs: every one is a babysitting epoch
        json.dumps(m, allow_nan=False)
        assert list(m["update_ratio"]) == ["layer1"] and 0 < m["update_ratio"]["layer1"] < 1
        assert m["seconds"] > 0 and m["samples_per_sec"] > 0
    assert history[-1]["val_acc"] > 0.9 and history[-1]["train_acc"] > 0.9
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    best = max(range(3), key=lambda i: history[i]["val_acc"])
    assert result["best_val_acc"] == history[best]["val_acc"] and result["best_epoch"] == best + 1
    # 200 samples at batch 64: 4 minibatches per epoch, the last one partial
    assert solver.model.calls == 12


def test_loss_trace_schedule_bounds_the_points_per_run():
    assert loss_trace_every(10, 5) == 1 and loss_trace_every(1000, 5) == 5 and loss_trace_every(700, 5) == 4
    for epochs, iterations in [(1, 1), (3, 7), (1000, 5), (700, 5), (7, 1000), (123, 457)]:
        every = loss_trace_every(epochs, iterations)
        points = len(range(0, epochs * iterations, every))
        assert points <= LOSS_TRACE_POINTS and (every == 1 or points > LOSS_TRACE_POINTS // 2)


def test_babysit_schedule_is_first_last_and_geometric_between():
    assert babysit_epochs(1) == (1,) and babysit_epochs(4) == (1, 2, 3, 4)
    assert babysit_epochs(1000) == (1, 4, 16, 63, 251, 1000)
    for epochs in range(1, 300):
        schedule = babysit_epochs(epochs)
        assert schedule[0] == 1 and schedule[-1] == epochs and len(schedule) <= BABYSIT_SNAPSHOTS
        assert list(schedule) == sorted(set(schedule))


@pytest.mark.parametrize("epochs, expected_points", [(1000, 1000), (700, 875)])
def test_a_long_trials_loss_trace_and_babysitting_stay_bounded(epochs, expected_points):
    """40 samples at batch 8: 5 minibatches per epoch, 5000 (3500) over the run; recorded every 5th (4th)."""
    from nncore.model import build_model

    data = blobs(n=60, dim=4)
    model = build_model({"hidden": [3]}, (4,), 3, seed=0)
    history = []
    result = Solver(model, data, {"update": "sgd", "lr": 1e-3, "epochs": epochs, "batch_size": 8},
                    callback=history.append).train()
    assert result["status"] == "completed" and len(history) == epochs
    trace = [point for m in history for point in m["loss_trace"]]
    every = loss_trace_every(epochs, 5)
    assert len(trace) == expected_points <= LOSS_TRACE_POINTS
    assert [it for it, _ in trace] == list(range(0, epochs * 5, every))
    assert all(isinstance(loss, float) and loss > 0 for _, loss in trace)
    for m in history:  # each epoch reports the points of its own minibatches
        assert all((m["epoch"] - 1) * 5 <= it < m["epoch"] * 5 for it, _ in m["loss_trace"])
    snapshots = [m for m in history if "babysit" in m]
    assert [m["epoch"] for m in snapshots] == list(babysit_epochs(epochs)) and len(snapshots) <= BABYSIT_SNAPSHOTS
    for m in snapshots:
        json.dumps(m["babysit"], allow_nan=False)
        assert set(m["babysit"]["activations"]) == {"layer1"} and set(m["babysit"]["gradients"]) == {"layer1", "layer2"}
        assert sum(m["babysit"]["activations"]["layer1"]["counts"]) == 40 * 3  # the whole training set, 3 units
    sizes = [len(m["babysit"]["activations"]["layer1"]["counts"]) for m in snapshots]
    assert sizes == [30] * len(snapshots)


def test_update_ratio_of_all_zero_weights_that_move_is_none_not_inf():
    """Weights at exactly zero (a huge L2 can decay float32 weights to 0) that then move have no finite
    update/weight ratio; the metrics stay strict JSON (the worker's history.jsonl refuses inf)."""
    history = []
    solver = make({"update": "sgd", "lr": 0.1, "epochs": 1, "batch_size": 500}, callback=history.append)
    solver.model.params["W1"][...] = 0.0
    assert solver.train()["status"] == "completed"
    assert history[0]["update_ratio"] == {"layer1": None}
    json.dumps(history[0], allow_nan=False)


def test_train_loss_is_sample_weighted_mean_of_minibatch_losses():
    history, losses = [], []
    solver = make({"lr": 0.1, "epochs": 1, "batch_size": 64}, callback=history.append)
    original = solver.model.loss

    def spy(x, y, **kw):
        loss, grads = original(x, y, **kw)
        if kw["train"]:  # not the babysitting snapshot's test-mode call
            losses.append((loss, len(x)))
        return loss, grads

    solver.model.loss = spy
    solver.train()
    assert [n for _, n in losses] == [64, 64, 64, 8]
    assert history[0]["train_loss"] == pytest.approx(sum(l * n for l, n in losses) / 200)
    assert history[0]["loss_trace"] == [[i, loss] for i, (loss, _) in enumerate(losses)]


def test_ema_is_running_average_of_parameters():
    data = blobs()
    solver = make({"lr": 0.5, "epochs": 1, "batch_size": 200, "ema_decay": 0.9}, data=data)
    w0 = {k: v.copy() for k, v in solver.model.params.items()}
    history = []
    solver.callback = history.append
    solver.train()  # exactly one update
    for k, w1 in solver.model.params.items():
        np.testing.assert_allclose(solver.ema_params[k], 0.9 * w0[k] + 0.1 * w1, rtol=1e-6)
        assert not np.allclose(w1, w0[k])
    assert history[0]["ema_val_acc"] == solver.accuracy(data.x_val, data.y_val, solver.ema_params)


def test_ema_decay_zero_tracks_parameters():
    solver = make({"lr": 0.1, "epochs": 2, "ema_decay": 0.0})
    solver.train()
    for k, w in solver.model.params.items():
        assert np.array_equal(solver.ema_params[k], w)


def test_clip_norm_bounds_each_sgd_step():
    solver = make({"update": "sgd", "lr": 1.0, "epochs": 1, "batch_size": 200, "clip_norm": 1e-3})
    w0 = {k: v.copy() for k, v in solver.model.params.items()}
    solver.train()
    step = math.sqrt(sum(float(np.sum((solver.model.params[k] - w0[k]) ** 2)) for k in w0))
    assert step == pytest.approx(1e-3, rel=1e-4)


class ScriptedLosses(LinearSoftmax):
    """Returns a scripted loss per call (then the real one) to drive the divergence checks."""

    def __init__(self, script):
        super().__init__(5, 3)
        self.script = list(script)

    def loss(self, x, y, train=True, **kw):
        loss, grads = super().loss(x, y, train=train, **kw)
        return (self.script.pop(0) if self.script and train else loss), grads


@pytest.mark.parametrize("script, reason, epochs_done", [
    ([2.3, 2.0, 2.0, 2.0, float("nan")], "non-finite loss at epoch 2", 1),
    ([2.3, 7.1], "loss 7.1 exceeded 3x initial loss 2.3 at epoch 1", 0),
    ([float("inf")], "non-finite loss at epoch 1", 0),
])
def test_divergence_aborts_with_reason(script, reason, epochs_done):
    history = []
    solver = Solver(ScriptedLosses(script), blobs(), {"epochs": 5, "batch_size": 64}, callback=history.append)
    result = solver.train()
    assert result["status"] == "diverged" and result["reason"] == reason
    assert result["epoch"] == epochs_done == len(history) == solver.epoch


def test_abort_factor_and_initial_loss_survive_resume():
    solver = Solver(ScriptedLosses([2.0]), blobs(), {"epochs": 1, "batch_size": 64})
    solver.train()
    state = solver.state_arrays()
    assert float(state["initial_loss"]) == 2.0
    fresh = Solver(ScriptedLosses([6.5]), blobs(), {"epochs": 2, "batch_size": 64, "abort_factor": 3.0})
    fresh.load_state_arrays(state)
    assert fresh.train()["reason"] == "loss 6.5 exceeded 3x initial loss 2 at epoch 2"


def test_should_stop_before_each_minibatch():
    calls, history = [], []

    def should_stop():
        calls.append(1)
        return len(calls) == 6

    solver = make({"epochs": 5, "batch_size": 64}, should_stop=should_stop, callback=history.append)
    result = solver.train()
    assert result == {"status": "stopped", "reason": "stop requested during epoch 2", "epoch": 1,
                      "best_val_acc": history[0]["val_acc"], "best_epoch": 1}
    # 4 minibatches per epoch: asked before each, the 6th answer stops before the 6th minibatch
    assert solver.model.calls == 5 and len(calls) == 6 and len(history) == 1


def test_stop_requested_in_last_minibatch_keeps_the_epoch():
    flag = {"stop": False}
    solver = make({"epochs": 3, "batch_size": 200}, should_stop=lambda: flag["stop"],
                  callback=lambda m: flag.update(stop=True))
    result = solver.train()
    assert result["status"] == "stopped" and result["epoch"] == 1 and solver.model.calls == 1


def test_val_points_score_the_subset_at_even_steps_without_changing_the_training():
    config = {"update": "adam", "lr": 0.01, "epochs": 2, "batch_size": 16}  # 200 samples: 13 steps an epoch
    plain, pointed = [], []
    a = make(config, dropout=0.2, seed=5, callback=plain.append)
    a.train()
    b = make({**config, "val_points": 4}, dropout=0.2, seed=5, callback=pointed.append)
    b.train()
    assert np.array_equal(a.model.params["W1"], b.model.params["W1"])  # scoring the subset changed nothing
    assert [m["val_acc"] for m in plain] == [m["val_acc"] for m in pointed] and "val_points" not in plain[0]
    # steps round(13 i / 4) = 3, 6, 10 (i = 1, 2, 3), then the epoch's end
    assert [[p[0] for p in m["val_points"]] for m in pointed] == [
        [round(e + s / 13, 4) for s in (3, 6, 10)] + [e + 1.0] for e in (0, 1)]
    subset = b._val_point_idx
    assert len(subset) == 100 and len(set(subset.tolist())) == 100  # all 100 val samples (fewer than 1000)
    end = pointed[0]["val_points"][-1][1]
    assert end == pointed[0]["val_acc"]  # the whole validation set is the subset here
    for steps, (at, acc) in zip((3, 6, 10, 13 + 3), pointed[0]["val_points"][:3] + pointed[1]["val_points"][:1]):
        calls = []  # a run stopped after ``steps`` minibatch steps holds the network the point scored
        c = make(config, dropout=0.2, seed=5, should_stop=lambda: calls.append(1) or len(calls) > steps)
        c.train()
        assert c.accuracy(c.data.x_val[subset], c.data.y_val[subset]) == acc, (steps, at)


def test_val_points_use_a_fixed_subset_of_a_large_validation_set():
    data = blobs(n=3600)  # 1200 validation samples
    history = []
    solver = make({"epochs": 1, "batch_size": 600, "val_points": 2}, data=data, callback=history.append)
    solver.train()
    subset = solver._val_point_idx
    assert len(subset) == 1000 and np.array_equal(subset, np.unique(subset))
    assert np.array_equal(subset, make({"val_points": 2}, data=data)._val_point_idx)  # the same for every epoch
    (half, end) = history[0]["val_points"]
    assert half[0] == 0.5 and end == [1.0, solver.accuracy(data.x_val[subset], data.y_val[subset])]


def test_same_seed_same_run_other_seed_other_order():
    runs = []
    for seed in (3, 3, 4):
        solver = make({"update": "adam", "lr": 0.01, "epochs": 2, "batch_size": 32}, seed=seed, dropout=0.2)
        solver.train()
        runs.append(solver.model.params["W1"])
    assert np.array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


@pytest.mark.parametrize("update", ["adam", "nesterov", "rmsprop"])
def test_resume_through_npz_is_exact(tmp_path, update):
    config = {"update": update, "lr": 0.01, "epochs": 3, "batch_size": 32, "lr_schedule": "cosine"}
    straight_history = []
    straight = make(config, dropout=0.2, seed=7, callback=straight_history.append)
    straight.train()

    first = make({**config, "epochs": 1}, dropout=0.2, seed=7)
    assert first.train()["epoch"] == 1
    np.savez(tmp_path / "state.npz", **first.state_arrays())
    resumed_history = []
    second = make(config, dropout=0.2, seed=7, callback=resumed_history.append)
    with np.load(tmp_path / "state.npz", allow_pickle=False) as arrays:
        second.load_state_arrays(arrays)
    assert second.epoch == 1
    result = second.train()
    assert result["epoch"] == 3
    a, b = straight.state_arrays(), second.state_arrays()
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    drop = ("seconds", "samples_per_sec")
    assert ([{k: v for k, v in m.items() if k not in drop} for m in straight_history[1:]]
            == [{k: v for k, v in m.items() if k not in drop} for m in resumed_history])


def test_state_arrays_layout():
    solver = make({"update": "adam", "epochs": 1})
    solver.train()
    state = solver.state_arrays()
    assert set(state) == {"param.W1", "param.b1", "ema.W1", "ema.b1", "opt.W1.m", "opt.W1.v", "opt.W1.t",
                          "opt.b1.m", "opt.b1.v", "opt.b1.t", "epoch", "initial_loss", "best_val_acc",
                          "best_epoch"}
    assert state["epoch"].shape == () and int(state["epoch"]) == 1 and int(state["opt.W1.t"]) == 2
    state["param.W1"][...] = 0  # a copy, not the live parameter
    assert np.any(solver.model.params["W1"] != 0)


def test_load_state_arrays_rejects_missing_and_mismatched():
    solver = make({"epochs": 1})
    state = solver.state_arrays()
    del state["ema.b1"]
    with pytest.raises(ValueError, match="missing 'ema.b1'"):
        solver.load_state_arrays(state)
    state = solver.state_arrays()
    state["param.W1"] = np.zeros((2, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="'param.W1' has shape"):
        solver.load_state_arrays(state)


@pytest.fixture(scope="module")
def digits():
    from nncore.data import load_dataset
    return load_dataset("digits", seed=0, preprocess="standardize")


def test_resume_real_model_with_dropout_and_batchnorm_is_exact(tmp_path, digits):
    from nncore.model import build_model

    model_cfg = {"hidden": [64, 32], "dropout": 0.3, "batchnorm": True}
    config = {"update": "adam", "lr": 3e-3, "epochs": 3, "batch_size": 100, "reg": 1e-3, "clip_norm": 5.0}

    def fresh(cfg):
        model = build_model(model_cfg, digits.input_shape, digits.num_classes, seed=1)
        return Solver(model, digits, cfg, seed=5)

    straight = fresh(config)
    straight.train()
    first = fresh({**config, "epochs": 1})
    first.train()
    np.savez(tmp_path / "ep1.npz", **first.state_arrays())
    second = fresh(config)
    with np.load(tmp_path / "ep1.npz", allow_pickle=False) as arrays:
        second.load_state_arrays(arrays)
    second.train()
    a, b = straight.state_arrays(), second.state_arrays()
    assert a.keys() == b.keys() and {"buf.bn1_mean", "opt.W1.t", "ema.gamma2"} <= a.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert straight.best_val_acc > 0.8  # it did train


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_train_digits_example_reaches_97_percent(seed):
    import importlib.util
    from pathlib import Path

    from threadpoolctl import threadpool_limits

    path = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"
    spec = importlib.util.spec_from_file_location("train_digits", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with threadpool_limits(1):
        test_acc, ema_test_acc = example.train(seed, log=lambda line: None)
    assert test_acc >= 0.97 and ema_test_acc >= 0.97


def test_scores_in_chunks_match_one_pass(monkeypatch):
    import nncore.solver as solver_module

    solver = make({"epochs": 1})
    x = blobs(n=30).x_train
    whole = solver.scores(x, solver.ema_params)
    monkeypatch.setattr(solver_module, "_EVAL_CHUNK", 7)
    assert np.allclose(solver.scores(x, solver.ema_params), whole)
    assert solver.scores(x[:0]).shape == (0, 3)
