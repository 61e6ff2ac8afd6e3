"""Minibatch training loop with per-epoch metrics, parameter EMA, divergence aborts and exact resume."""
import logging
import math
import numbers
import time
from collections.abc import Mapping

import numpy as np

from nncore import optim
from nncore.errors import ConfigError
from nncore.model import LOSSES
from nncore.schedules import SCHEDULES, lr_at
from nncore.stats import babysit_stats, update_weight_ratios

logger = logging.getLogger(__name__)

SOLVER_DEFAULTS = {
    "update": "sgd",
    **optim.DEFAULTS,
    "reg": 0.0,
    "batch_size": 128,
    "epochs": 10,
    "lr_schedule": "constant",
    "lr_decay": 0.95,
    "lr_step": 1,
    "lr_min": 0.0,
    "clip_norm": 0.0,
    "ema_decay": 0.995,
    "train_eval_samples": 1000,
    "abort_factor": 3.0,
    "val_points": 1,
}

_EVAL_CHUNK = 4096  # rows per forward pass when evaluating
_TRAIN_EVAL_STREAM = 2**32 - 1  # SeedSequence key of the fixed training subsample (epochs use [seed, epoch])
_BABYSIT_STREAM = 2**32 - 2  # SeedSequence key of the fixed babysitting batch
_VAL_POINT_STREAM = 2**32 - 3  # SeedSequence key of the fixed validation subset of sub-epoch points
VAL_POINT_SAMPLES = 1000  # validation samples of the fixed subset scored at each of an epoch's val_points
LOSS_TRACE_POINTS = 1000  # most minibatch losses recorded over a run's whole epoch budget
BABYSIT_SNAPSHOTS = 6  # most babysitting snapshots per run
BABYSIT_SAMPLES = 256  # training samples in the fixed babysitting batch

# field -> (kind, low, high, low_inclusive, high_inclusive); kind "float" accepts ints, "int" integral numbers.
_RANGES = {
    "lr": ("float", 0.0, math.inf, False, False),
    "momentum": ("float", 0.0, 1.0, True, False),
    "beta1": ("float", 0.0, 1.0, True, False),
    "beta2": ("float", 0.0, 1.0, True, False),
    "eps": ("float", 0.0, math.inf, False, False),
    "decay_rate": ("float", 0.0, 1.0, True, False),
    "reg": ("float", 0.0, math.inf, True, False),
    "batch_size": ("int", 1, math.inf, True, False),
    "epochs": ("int", 1, math.inf, True, False),
    "lr_decay": ("float", 0.0, math.inf, False, False),
    "lr_step": ("int", 1, math.inf, True, False),
    "lr_min": ("float", 0.0, math.inf, True, False),
    "clip_norm": ("float", 0.0, math.inf, True, False),
    "ema_decay": ("float", 0.0, 1.0, True, False),
    "train_eval_samples": ("int", 1, math.inf, True, False),
    "abort_factor": ("float", 1.0, math.inf, False, False),
    "val_points": ("int", 1, 100, True, True),
}
_CHOICES = {"update": optim.UPDATES, "lr_schedule": SCHEDULES}


def _check_number(name, value, kind, low, high, low_incl, high_incl):
    """Return value as a Python int/float, or raise ConfigError naming solver.<name>."""
    is_real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind == "int":
        ok = is_real and float(value).is_integer()
        value = int(value) if ok else value
    else:
        ok = is_real and math.isfinite(float(value))
        value = float(value) if ok else value
    if ok:
        ok = (low <= value if low_incl else low < value) and (value <= high if high_incl else value < high)
    if not ok:
        lo, hi = ("[" if low_incl else "("), ("]" if high_incl else ")")
        raise ConfigError(f"solver.{name}: expected {'an int' if kind == 'int' else 'a number'} "
                          f"in {lo}{low:g}, {high:g}{hi}, got {value!r}")
    return value


def divergence(loss, initial_loss, factor, epoch):
    """Why training has diverged at ``epoch`` (1-based), or None: a non-finite loss, or a loss above ``factor``
    times the initial loss (when that is known). The one rule, applied by the Solver to every minibatch and by
    the master's watch to the losses workers report."""
    if not math.isfinite(loss):
        return f"non-finite loss at epoch {epoch}"
    if initial_loss is not None and math.isfinite(initial_loss) and loss > factor * initial_loss:
        return f"loss {loss:.3g} exceeded {factor:g}x initial loss {initial_loss:.3g} at epoch {epoch}"
    return None


def loss_trace_every(epochs, iterations_per_epoch, points=LOSS_TRACE_POINTS):
    """Record the minibatch loss at global iterations 0, k, 2k, ...: the smallest k that keeps the count of
    recorded points over `epochs` epochs at most `points`."""
    return max(1, -(-epochs * iterations_per_epoch // points))


def babysit_epochs(epochs, count=BABYSIT_SNAPSHOTS):
    """The epochs (1-based, after training them) that get a babysitting snapshot: the first, the last and
    up to count - 2 between them on a geometric schedule (1000 epochs: 1, 4, 16, 63, 251, 1000)."""
    if epochs <= count:
        return tuple(range(1, epochs + 1))
    return tuple(sorted({round(epochs ** (i / (count - 1))) for i in range(count)}))


def validate_solver_config(cfg):
    """Return cfg with defaults filled and numbers normalised; raise ConfigError naming solver.<field>."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"solver: expected a table of fields, got {type(cfg).__name__}")
    unknown = sorted(str(key) for key in cfg if key not in SOLVER_DEFAULTS)
    if unknown:
        raise ConfigError(f"solver.{unknown[0]}: unknown field (known: {', '.join(SOLVER_DEFAULTS)})")
    out = {**SOLVER_DEFAULTS, **cfg}
    for name, choices in _CHOICES.items():
        if not (isinstance(out[name], str) and out[name] in choices):
            raise ConfigError(f"solver.{name}: expected one of {sorted(choices)}, got {out[name]!r}")
    for name, spec in _RANGES.items():
        out[name] = _check_number(name, out[name], *spec)
    return out


class Solver:
    """Train `model` on `data` (x_train, y_train, x_val, y_val) with a validated solver config.

    Epoch e (0-based) shuffles with, and draws dropout masks from, np.random.default_rng([seed, e]), so a
    solver restored with load_state_arrays() continues exactly as an uninterrupted one. should_stop() is
    asked before every minibatch; after a stop or divergence the parameters hold a partial epoch, so resume
    from the state saved at the last callback. Metrics passed to the callback after each epoch: "epoch"
    (epochs done), "train_loss" (sample-weighted mean minibatch loss, L2 included), "train_acc" (test mode,
    on a fixed subsample of train_eval_samples), "val_loss" (data loss), "val_acc", "ema_val_acc" (with
    ema_params), "lr", "update_ratio" ({layer: ||dW|| / ||W||} of the epoch's last update; None for a
    layer whose weights were all zero, e.g. decayed to zero by a huge L2, and moved), "seconds" (epoch
    wall time, evaluation included), "samples_per_sec" (of the minibatch loop), "loss_trace" ([[iteration,
    minibatch loss], ...] recorded this epoch, global 0-based iterations every loss_trace_every(...) steps:
    at most LOSS_TRACE_POINTS over the configured epochs) and, on the epochs of babysit_epochs(epochs) only,
    "babysit" (nncore.stats.babysit_stats on a fixed batch of BABYSIT_SAMPLES training samples). With
    val_points k > 1, "val_points" ([[epochs done as a fraction, accuracy], ...]: the accuracy on a fixed
    subset of VAL_POINT_SAMPLES validation samples after k evenly spaced minibatch steps of the epoch, the last
    at its end), so a short run is a curve, not one point; scoring the subset does not change the training.
    Both schedules are functions of the epoch and the config alone, so a resumed run records what an
    uninterrupted one does.
    """

    def __init__(self, model, data, config, *, seed=0, callback=None, should_stop=None):
        self.model = model
        self.data = data
        self.config = validate_solver_config(config)
        self.seed = int(seed)
        self.callback = callback
        self.should_stop = should_stop
        self.epoch = 0
        self.initial_loss = math.nan  # first minibatch loss, the reference for divergence
        self.best_val_acc = 0.0
        self.best_epoch = 0
        self.opt_state = {name: {} for name in model.params}
        self.ema_params = {name: w.copy() for name, w in model.params.items()}
        n_train = len(data.x_train)
        n_eval = min(self.config["train_eval_samples"], n_train)
        picker = np.random.default_rng([self.seed, _TRAIN_EVAL_STREAM])
        self._train_eval_idx = np.sort(picker.choice(n_train, size=n_eval, replace=False))
        picker = np.random.default_rng([self.seed, _BABYSIT_STREAM])
        self._babysit_idx = np.sort(picker.choice(n_train, size=min(BABYSIT_SAMPLES, n_train), replace=False))
        n_val = len(data.x_val)
        picker = np.random.default_rng([self.seed, _VAL_POINT_STREAM])
        self._val_point_idx = np.sort(picker.choice(n_val, size=min(VAL_POINT_SAMPLES, n_val), replace=False))
        self._loss_fn = LOSSES[model.config["loss"]]

    # ---------------------------------------------------------------- training

    def train(self):
        """Train from self.epoch up to config["epochs"]; return status, reason, epochs done and the best val acc."""
        cfg = self.config
        while self.epoch < cfg["epochs"]:
            stop = self._train_epoch()
            if stop is not None:
                status, reason = stop
                logger.info("training %s: %s", status, reason)
                return self._result(status, reason)
        return self._result("completed", f"trained {self.epoch} epoch{'s' if self.epoch != 1 else ''}")

    def _result(self, status, reason):
        return {"status": status, "reason": reason, "epoch": self.epoch,
                "best_val_acc": self.best_val_acc, "best_epoch": self.best_epoch}

    def _train_epoch(self):
        """Run one epoch; return (status, reason) when training must end early, else None."""
        model, data, cfg = self.model, self.data, self.config
        x_train, y_train = data.x_train, data.y_train
        n, batch = len(x_train), cfg["batch_size"]
        hyper = {**cfg, "lr": lr_at(self.epoch, cfg)}
        update = optim.UPDATES[cfg["update"]]
        reg, clip_norm = cfg["reg"], cfg["clip_norm"]
        decay = cfg["ema_decay"]
        factor = cfg["abort_factor"]
        # one scratch buffer per parameter for the update's and the EMA's temporaries: no allocation per step
        slots = [(model.params[k], self.opt_state[k], self.ema_params[k], k, np.empty_like(model.params[k]))
                 for k in model.params]
        weights = model.weight_names
        last_start = (n - 1) // batch * batch
        iterations = -(-n // batch)
        every = loss_trace_every(cfg["epochs"], iterations)
        first_iteration = self.epoch * iterations
        offset = -first_iteration % every  # local step of the epoch's first recorded loss
        trace = np.empty(len(range(offset, iterations, every)))
        marks = {round(i * iterations / cfg["val_points"]) for i in range(1, cfg["val_points"])} - {0, iterations}
        points, point_seconds = [], 0.0

        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n)
        x_buf = np.empty((min(batch, n),) + x_train.shape[1:], dtype=x_train.dtype)
        y_buf = np.empty(min(batch, n), dtype=y_train.dtype)
        loss_sum = 0.0
        started = time.perf_counter()
        for start in range(0, n, batch):
            if self.should_stop is not None and self.should_stop():
                return "stopped", f"stop requested during epoch {self.epoch + 1}"
            idx = order[start:start + batch]
            xb, yb = x_buf[:len(idx)], y_buf[:len(idx)]
            np.take(x_train, idx, axis=0, out=xb, mode="clip")
            np.take(y_train, idx, axis=0, out=yb, mode="clip")
            loss, grads = model.loss(xb, yb, reg=reg, train=True, rng=rng)
            if (why := divergence(loss, self.initial_loss, factor, self.epoch + 1)) is not None:
                return "diverged", why
            if math.isnan(self.initial_loss):
                self.initial_loss = loss
            loss_sum += loss * len(idx)
            step = start // batch
            if step % every == offset:
                trace[step // every] = loss
            if clip_norm:
                optim.clip_gradients(grads, clip_norm)
            if start == last_start:
                before = {k: model.params[k].copy() for k in weights}
            for w, state, ema, k, scratch in slots:
                update(w, grads[k], state, hyper, scratch)
                ema *= decay
                ema += np.multiply(w, 1.0 - decay, out=scratch)
            if step + 1 in marks:
                scored = time.perf_counter()
                idx = self._val_point_idx
                points.append([round(self.epoch + (step + 1) / iterations, 4),
                               self.accuracy(data.x_val[idx], data.y_val[idx])])
                point_seconds += time.perf_counter() - scored
        train_seconds = time.perf_counter() - started - point_seconds

        self.epoch += 1
        metrics = {"epoch": self.epoch, "train_loss": loss_sum / n}
        metrics.update(self._evaluate(points if cfg["val_points"] > 1 else None))
        if self.epoch in babysit_epochs(cfg["epochs"]):
            idx = self._babysit_idx
            metrics["babysit"] = babysit_stats(model, data.x_train[idx], data.y_train[idx])
        metrics.update({
            "lr": hyper["lr"],
            "update_ratio": {layer: ratio if math.isfinite(ratio) else None  # None: all-zero weights moved
                             for layer, ratio in update_weight_ratios(before, model.params, weights).items()},
            "seconds": time.perf_counter() - started,
            "samples_per_sec": n / train_seconds,
            "loss_trace": [[first_iteration + offset + j * every, value] for j, value in enumerate(trace.tolist())],
        })
        if metrics["val_acc"] > self.best_val_acc or self.best_epoch == 0:
            self.best_val_acc, self.best_epoch = metrics["val_acc"], self.epoch
        if self.callback is not None:
            self.callback(metrics)
        return None

    # -------------------------------------------------------------- evaluation

    def scores(self, x, params=None):
        """Test-mode logits for x, computed in chunks (params overrides the model's, e.g. self.ema_params)."""
        if len(x) <= _EVAL_CHUNK:
            return self.model.scores(x, params=params)
        return np.concatenate([self.model.scores(x[i:i + _EVAL_CHUNK], params=params)
                               for i in range(0, len(x), _EVAL_CHUNK)])

    def accuracy(self, x, y, params=None):
        """Fraction of x classified as y in test mode."""
        return float(np.mean(self.scores(x, params).argmax(axis=1) == y))

    def _evaluate(self, points=None):
        """End-of-epoch metrics; ``points`` (the epoch's sub-epoch points) gets the subset's accuracy at its end."""
        data, idx = self.data, self._train_eval_idx
        val_scores = self.scores(data.x_val)
        val_loss, _ = self._loss_fn(val_scores, data.y_val)
        correct = val_scores.argmax(axis=1) == data.y_val
        metrics = {
            "train_acc": self.accuracy(data.x_train[idx], data.y_train[idx]),
            "val_loss": float(val_loss),
            "val_acc": float(np.mean(correct)),
            "ema_val_acc": self.accuracy(data.x_val, data.y_val, self.ema_params),
        }
        if points is not None:
            metrics["val_points"] = points + [[float(self.epoch), float(np.mean(correct[self._val_point_idx]))]]
        return metrics

    # ------------------------------------------------------------ checkpoints

    def state_arrays(self):
        """Everything needed to resume, as a flat dict of arrays (copies) for np.savez."""
        out = {f"param.{k}": w.copy() for k, w in self.model.params.items()}
        out.update({f"ema.{k}": w.copy() for k, w in self.ema_params.items()})
        out.update({f"buf.{k}": b.copy() for k, b in self.model.buffers.items()})
        for k, state in self.opt_state.items():
            out.update({f"opt.{k}.{key}": np.array(v, copy=True) for key, v in state.items()})
        out["epoch"] = np.array(self.epoch, dtype=np.int64)
        out["initial_loss"] = np.array(self.initial_loss, dtype=np.float64)
        out["best_val_acc"] = np.array(self.best_val_acc, dtype=np.float64)
        out["best_epoch"] = np.array(self.best_epoch, dtype=np.int64)
        return out

    def load_state_arrays(self, arrays):
        """Restore parameters, EMA, buffers, optimizer state and counters saved by state_arrays()."""
        for prefix, target in (("param.", self.model.params), ("ema.", self.ema_params),
                               ("buf.", self.model.buffers)):
            for k, dst in target.items():
                key = prefix + k
                if key not in arrays:
                    raise ValueError(f"state arrays: missing {key!r}")
                src = arrays[key]
                if src.shape != dst.shape:
                    raise ValueError(f"state arrays: {key!r} has shape {src.shape}, expected {dst.shape}")
                dst[...] = src
        self.opt_state = {k: {} for k in self.model.params}
        for key in arrays:
            if key.startswith("opt."):
                name, slot = key[len("opt."):].rsplit(".", 1)
                if name not in self.opt_state:
                    raise ValueError(f"state arrays: {key!r} names no parameter")
                self.opt_state[name][slot] = np.array(arrays[key], copy=True)
        self.epoch = int(arrays["epoch"])
        self.initial_loss = float(arrays["initial_loss"])
        self.best_val_acc = float(arrays["best_val_acc"])
        self.best_epoch = int(arrays["best_epoch"])
