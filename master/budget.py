"""A plan sized from a budget: parse ``--budget``, measure an epoch, and size the stages to fill the budget."""
from __future__ import annotations

import dataclasses
import math
import re
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from master.config import ConfigError, ExperimentConfig, StageConfig, pooled_stages

MAX_TRIALS = 2000  # the most trials a sized first stage gets
STAGE_SECONDS = 4.0  # wall seconds a stage costs besides its trials: workers and Redis start, polls, closing
TRIAL_SECONDS = 0.02  # worker seconds a trial costs besides its epochs (measure() replaces it)
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "ep": 1.0}
_BUDGET = re.compile(r"^(?P<amount>\d+(?:\.\d+)?)(?P<unit>s|m|h|ep)$")


class BudgetError(ConfigError):
    """A budget that cannot be parsed or is too small for one epoch of one trial."""


@dataclass(frozen=True)
class Budget:
    """What a search may spend: wall-clock seconds (``unit`` "s") or epochs summed over trials ("ep")."""

    amount: float
    unit: str
    text: str

    @property
    def seconds(self) -> bool:
        return self.unit == "s"

    def describe(self, amount: float | None = None) -> str:
        value = self.amount if amount is None else amount
        return f"{value:.0f} s" if self.seconds else f"{value:.0f} epochs"


def parse_budget(text: str) -> Budget:
    """``20m``, ``90s``, ``1.5h`` (wall time) or ``2000ep`` (epochs) as a Budget; BudgetError names the input."""
    match = _BUDGET.match(str(text).strip())
    if match is None or float(match["amount"]) <= 0:
        raise BudgetError(f"--budget {text!r}: expected a positive wall time like 90s, 20m, 1.5h, or epochs like "
                          f"2000ep")
    unit = match["unit"]
    return Budget(float(match["amount"]) * _UNITS[unit], "ep" if unit == "ep" else "s", str(text).strip())


@dataclass(frozen=True)
class Costs:
    """The cost model of a plan in wall seconds: per epoch and per trial on one worker, per stage, ``workers``."""

    epoch: float
    trial: float = TRIAL_SECONDS
    stage: float = STAGE_SECONDS
    workers: int = 1


def start_epoch(stages: Sequence[StageConfig], i: int) -> int:
    """Epochs a trial of stage ``i`` brings along: the previous stage's for a promote stage, else 0."""
    return stages[i - 1].epochs if i and stages[i].method == "promote" else 0


def stage_cost(stages: Sequence[StageConfig], i: int, costs: Costs | None) -> float:
    """The most stage ``i`` costs, every trial trained to the end (pruning only saves): epochs (``costs`` None)
    or wall seconds."""
    length = stages[i].epochs - start_epoch(stages, i)
    epochs = stages[i].trials * length
    if costs is None:
        return epochs
    work = (stages[i].trials * costs.trial + epochs * costs.epoch) / costs.workers
    longest = costs.trial + length * costs.epoch
    return costs.stage + max(work, longest)


def plan_cost(stages: Sequence[StageConfig], costs: Costs | None = None) -> float:
    """Expected cost of running ``stages`` in order: epochs (``costs`` None) or wall seconds."""
    return sum(stage_cost(stages, i, costs) for i in range(len(stages)))


def fit_costs(prior: Costs, trials: Sequence[tuple[int, float]], stages: Sequence[tuple[float, float]]) -> Costs:
    """``prior`` refitted to what ran: epoch and trial seconds by least squares over the trials' (epochs trained,
    worker seconds) (the prior's ratio, rescaled, where all trained as many epochs), and a stage's own cost as
    the mean over ``stages`` of (wall seconds - worker seconds / workers), never negative."""
    if not trials:
        return prior
    epochs = np.array([t[0] for t in trials], dtype=float)
    seconds = np.array([t[1] for t in trials], dtype=float)
    if np.ptp(epochs) > 0:
        epoch = float(np.cov(epochs, seconds, bias=True)[0, 1] / np.var(epochs))
        trial = float(seconds.mean() - epoch * epochs.mean())
        if trial < 0 or epoch <= 0:
            epoch, trial = float(seconds.sum() / max(epochs.sum(), 1)), 0.0
    else:
        factor = seconds.mean() / (prior.trial + epochs.mean() * prior.epoch)
        epoch, trial = prior.epoch * factor, prior.trial * factor
    stage = prior.stage if not stages else max(0.0, float(np.mean([w - s / prior.workers for w, s in stages])))
    return dataclasses.replace(prior, epoch=epoch, trial=trial, stage=stage)


def scale(stages: Sequence[StageConfig], n: int, done: int = 0, available: int | None = None
          ) -> tuple[StageConfig, ...]:
    """``stages`` with the first ``done`` kept, ``n`` trials in the next and the later ones' trial counts in the
    same proportion (at least one; a promote stage takes at most the trials of the stage before it, or
    ``available``, those that completed it, when it has run; with pool "all", also those of the earlier stages
    that stopped at the same epochs)."""
    out = list(stages[:done])
    for stage in stages[done:]:
        trials = max(1, round(n * stage.trials / stages[done].trials))
        if stage.method == "promote" and out:
            cap = available if available is not None and len(out) == done else out[-1].trials
            if stage.pool == "all":
                cap += sum(s.trials for s in pooled_stages(out, len(out))[:-1])
            trials = max(1, min(trials, cap))
            out.append(dataclasses.replace(stage, trials=trials, top=trials))
        else:
            out.append(dataclasses.replace(stage, trials=trials))
    return tuple(out)


def largest(stages: Sequence[StageConfig], amount: float, costs: Costs | None, done: int = 0,
            available: int | None = None) -> int:
    """The largest ``n`` (at most MAX_TRIALS, 0 when none) for which ``scale(stages, n, done, available)``'s
    stages after the first ``done`` are expected to cost at most ``amount``."""
    def cost(n: int) -> float:
        sized = scale(stages, n, done, available)
        return sum(stage_cost(sized, i, costs) for i in range(done, len(sized)))
    low, high = 0, MAX_TRIALS
    while low < high:  # the cost grows with n
        mid = (low + high + 1) // 2
        low, high = (mid, high) if cost(mid) <= amount else (low, mid - 1)
    return low


def size_plan(stages: Sequence[StageConfig], amount: float, costs: Costs | None = None) -> tuple[StageConfig, ...]:
    """The most trials in the shape of ``stages`` whose expected cost (epochs, or seconds under ``costs``) fits
    ``amount``; when one trial per stage does not fit, one random stage of one trial with the epochs that fit.
    BudgetError when not even one epoch of one trial fits."""
    if n := largest(stages, amount, costs):
        return scale(stages, n)
    for epochs in range(max(s.epochs for s in stages), 0, -1):
        single = (StageConfig(stages[0].name, epochs=epochs, trials=1, prune="none"),)
        if plan_cost(single, costs) <= amount:
            return single
    one = plan_cost((StageConfig(stages[0].name, epochs=1, trials=1, prune="none"),), costs)
    raise BudgetError(f"too small for one epoch of one trial (that needs about {one:.1f} "
                      f"{'s' if costs else 'epoch'} here)")


def resize(stages: Sequence[StageConfig], done: int, amount: float, costs: Costs | None,
           available: int | None = None) -> tuple[StageConfig, ...]:
    """``stages`` whose first ``done`` have run, the rest re-sized to the most trials that fit ``amount`` (what
    is left of the budget), at least one each; ``available``: trials that completed the last stage run."""
    if done <= 0 or done >= len(stages):
        return tuple(stages)
    return scale(stages, max(1, largest(stages, amount, costs, done, available)), done, available)


def plan_lines(stages: Sequence[StageConfig], budget: Budget, costs: Costs | None, first: int = 0) -> list[str]:
    """The lines that show a sized plan from stage ``first`` on: one per stage, and its most cost."""
    lines = []
    for i, s in list(enumerate(stages))[first:]:
        share = s.method == "promote" and s.quantile is not None
        best = f"the best {s.quantile:.0%} of those completed" if share else "best"
        how = {"random": "sampled", "narrow": "narrowed",
               "promote": f"{best} continued from epoch {start_epoch(stages, i)}"}
        count = f"at most {s.trials}" if share else f"{s.trials}"
        lines.append(f"  {s.name}: {count} trials x {s.epochs} epochs ({how[s.method]}, prune {s.prune}), "
                     f"at most {stage_cost(stages, i, None):.0f} epochs"
                     + (f", {stage_cost(stages, i, costs):.0f} s" if costs and budget.seconds else ""))
    total = sum(stage_cost(stages, i, costs if budget.seconds else None) for i in range(first, len(stages)))
    lines.append(f"  at most {budget.describe(total)} in all")
    return lines


def plan_entry(stages: Sequence[StageConfig], after: str | None, left: float, most: float) -> dict[str, Any]:
    """A plan as experiment.json records it: when, after which stage, budget left, its most cost, its stages."""
    from worker.store import now_iso

    return {"at": now_iso(), "after": after, "left": round(left, 3), "most": round(most, 3),
            "stages": [{"name": s.name, **s.to_dict()} for s in stages]}


def planned_config(config: ExperimentConfig, record: Any) -> ExperimentConfig:
    """``config`` with the stages of the last plan recorded in experiment.json ``record`` (a sized launch)."""
    if record is None or not record.plans:
        return config
    try:
        stages = tuple(StageConfig(**table) for table in record.plans[-1]["stages"])
        return dataclasses.replace(config, stages=stages)
    except (TypeError, KeyError, ConfigError) as exc:
        raise ConfigError(f"experiment {config.name}: the plan in experiment.json is unreadable: {exc}") from None


def measure(config: ExperimentConfig) -> Costs:
    """The first stage's first trial trained here (one BLAS thread, as a worker; scratch storage) for 1 and for 3
    epochs, twice each after a warm-up (the faster counts): an epoch's seconds and a trial's besides (1 worker)."""
    from threadpoolctl import threadpool_limits

    from master.sampler import sample_trials
    from nncore.data import load_dataset
    from worker.store import ExperimentStore
    from worker.trainer import run_trial

    spec = sample_trials(config, config.stages[0].name, 1)[0]
    load_dataset(spec.dataset, **spec.data)
    seconds: dict[int, float] = {}
    with threadpool_limits(limits=1):
        for epochs in (1, 1, 3, 1, 3):  # a warm-up, then the timed runs
            with tempfile.TemporaryDirectory(prefix="hypersearch-measure-") as scratch:
                store = ExperimentStore(scratch, config.name)
                store.ensure()
                started = time.perf_counter()
                run_trial(dataclasses.replace(spec, epochs=epochs), store, _Silent())
                seconds[epochs] = min(seconds.get(epochs, math.inf), time.perf_counter() - started)
    one, three = seconds[1], seconds[3]
    epoch = max((three - one) / 2, one / 4)  # noise on a busy machine cannot make an epoch nearly free
    return Costs(epoch, trial=max(0.0, one - epoch))


class _Silent:
    """A trial control that never stops and reports nowhere (for the measured epoch)."""

    def should_stop(self) -> None:
        return None

    def confirm(self) -> None:
        """Nothing to confirm: the trial runs here."""

    def report(self, fields: dict[str, Any]) -> None:
        """Progress goes nowhere."""
