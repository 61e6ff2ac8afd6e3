"""Learning-rate schedules as pure functions of the (possibly fractional) epoch and the solver config."""
import math

from nncore.errors import ConfigError


def _constant(epoch, lr, lr_min, config):
    return lr


def _step(epoch, lr, lr_min, config):
    return lr * config["lr_decay"] ** math.floor(epoch / config["lr_step"])


def _exponential(epoch, lr, lr_min, config):
    return lr * config["lr_decay"] ** epoch


def _inverse_time(epoch, lr, lr_min, config):
    return lr / (1.0 + config["lr_decay"] * epoch)


def _cosine(epoch, lr, lr_min, config):
    progress = min(epoch / config["epochs"], 1.0)
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * progress))


# name -> rule(epoch, lr, lr_min, config); every rule equals lr at epoch 0.
SCHEDULES = {
    "constant": _constant,
    "step": _step,
    "exponential": _exponential,
    "inverse_time": _inverse_time,
    "cosine": _cosine,
}

# Solver fields each schedule reads besides lr and lr_min (every schedule is floored at lr_min).
SCHEDULE_READS = {"constant": (), "step": ("lr_decay", "lr_step"), "exponential": ("lr_decay",),
                  "inverse_time": ("lr_decay",), "cosine": ()}


def lr_at(epoch, config):
    """Learning rate for `epoch` (0 = start of training) under config["lr_schedule"].

    constant: lr; step: lr * lr_decay ** floor(epoch / lr_step); exponential: lr * lr_decay ** epoch;
    inverse_time (1/t): lr / (1 + lr_decay * epoch); cosine: lr_min + (lr - lr_min)(1 + cos(pi * epoch/epochs))/2,
    held at lr_min after `epochs`. The result is never below lr_min (default 0).
    """
    name = config.get("lr_schedule", "constant")
    rule = SCHEDULES.get(name)
    if rule is None:
        raise ConfigError(f"solver.lr_schedule: expected one of {sorted(SCHEDULES)}, got {name!r}")
    lr = float(config["lr"])
    lr_min = float(config.get("lr_min", 0.0))
    return max(float(rule(epoch, lr, lr_min, config)), lr_min)
