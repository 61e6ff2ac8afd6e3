"""Parse and validate an experiment's TOML config: settings, fixed fields, stages and the search space."""
from __future__ import annotations

import copy
import difflib
import json
import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from os import PathLike
from typing import Any, Sequence

import numpy as np

from nncore.data import DATASETS
from nncore.errors import ConfigError
from nncore.model import MODEL_DEFAULTS
from nncore.solver import SOLVER_DEFAULTS
from worker.jobs import HEARTBEAT_SECONDS as WORKER_HEARTBEAT_SECONDS
from worker.spec import NAME_RE, SpecError, TrialSpec, check_name, trial_id

DISTRIBUTIONS = ("uniform", "loguniform", "int", "logint", "choice")
METHODS = ("random", "narrow", "promote")
PRUNERS = ("asha", "median", "none")
SECTIONS = ("experiment", "data", "model", "solver", "stages", "space", "watch")
EXPERIMENT_KEYS = ("name", "dataset", "seed", "keep", "sanity")
STAGE_KEYS = ("epochs", "trials", "method", "top", "quantile", "pad", "prune", "rung", "eta", "hedge", "pool",
              "val_points")
POOLS = ("previous", "all")  # a promote stage's candidates: the previous stage's trials, or every earlier stage's
DISTRIBUTION_KEYS = ("dist", "low", "high", "values", "when")
# Fields a search space may sample, per section; a stage's epochs are its budget, never sampled.
SAMPLED_FIELDS = {"model": tuple(MODEL_DEFAULTS), "solver": tuple(k for k in SOLVER_DEFAULTS if k != "epochs")}
DEFAULT_QUANTILE = 0.2
MAX_TRIALS = 100_000  # per stage: each trial is a folder and a job; more is a typo, not a search
MAX_CONFIG_BYTES = 1 << 20  # a config file is refused unread above this (a search config is a few KiB)
MIN_HEARTBEAT_SECONDS = 1.5 * WORKER_HEARTBEAT_SECONDS  # [watch] heartbeat_seconds: the workers' beat and a margin
DEFAULT_CONFIG = "default.toml"  # package data of `master`, loaded when no config file is given

# Range probes: both ends and an irrational interior point (non-integral, so uniform on an int field fails early).
_PROBE_UNITS = (0.0, 1.0, math.sqrt(0.5))
_TOML_POSITION = re.compile(r"^(?P<msg>.*) \(at (?:line (?P<line>\d+), column (?P<column>\d+)|end of document)\)$",
                            re.DOTALL)


def did_you_mean(word: Any, known: Any) -> str:
    """" (did you mean 'x'?)" naming the closest of ``known`` to ``word``, or "" when none is close."""
    close = difflib.get_close_matches(str(word), [str(k) for k in known], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _name(value: Any, what: str) -> str:
    """``worker.spec.check_name`` raising ConfigError."""
    try:
        return check_name(value, what)
    except SpecError as exc:
        raise ConfigError(str(exc)) from None


def _int(value: Any, where: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{where}: expected an integer >= {low}, got {value!r}")
    return value


def check_trials(value: Any, where: str) -> int:
    """``value`` as a stage's trial count: an integer from 1 to MAX_TRIALS, else ConfigError naming ``where``."""
    if _int(value, where, 1) > MAX_TRIALS:
        raise ConfigError(f"{where}: {value} is more than the {MAX_TRIALS:,} trials a stage may have")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return value


def _is_json_value(value: Any) -> bool:
    """True when ``value`` survives a JSON round trip unchanged (no tuples, dates, NaN or non-string keys)."""
    try:
        return json.loads(json.dumps(value, allow_nan=False)) == value
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class Distribution:
    """How one field is sampled; ``name`` is its dotted path ("solver.lr").

    Numeric kinds use ``low``/``high`` (int and logint include both ends), choice uses ``values``.
    ``to_unit``/``from_unit`` map between a value and [0, 1] in the sampled scale (log10 for the log kinds):
    low -> 0, high -> 1 (choice: first -> 0, last -> 1, by position); outside [0, 1] extrapolates.
    """

    name: str
    dist: str
    low: float | int | None = None
    high: float | int | None = None
    values: tuple = ()
    when: tuple = ()  # ((dotted field, (values...)), ...): sampled only where every field takes one of its values

    def __post_init__(self) -> None:
        where = f"space.{self.name}"
        if self.dist not in DISTRIBUTIONS:
            raise ConfigError(f"{where}.dist: unknown distribution {self.dist!r} (known: {', '.join(DISTRIBUTIONS)})"
                              + did_you_mean(self.dist, DISTRIBUTIONS))
        self._check_when(where)
        if self.dist == "choice":
            self._check_choice(where)
        else:
            self._check_range(where)

    def _check_when(self, where: str) -> None:
        """Normalize ``when`` (a table or pairs) to ((field, (values...)), ...); a single value becomes a list."""
        pairs = list(self.when.items()) if isinstance(self.when, dict) else self.when
        if not isinstance(pairs, (tuple, list)):
            raise ConfigError(f'{where}.when: expected a table like {{ "solver.update" = ["adam"] }}, '
                              f"got {self.when!r}")
        when = []
        for item in pairs:
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
                raise ConfigError(f"{where}.when: expected field = [values] pairs, got {item!r}")
            key, values = item[0], item[1] if isinstance(item[1], (list, tuple)) else [item[1]]
            if not values or not all(_is_json_value(v) for v in values):
                raise ConfigError(f'{where}.when."{key}": expected a non-empty list of values, got {item[1]!r}')
            when.append((key, tuple(values)))
        object.__setattr__(self, "when", tuple(when))

    def applies(self, value_of: Any) -> str | None:
        """None when the condition holds given ``value_of(dotted field)``, else why it fails."""
        for key, values in self.when:
            if value_of(key) not in values:
                return f"{key} = {json.dumps(value_of(key))} is not one of {json.dumps(list(values))}"
        return None

    def _check_choice(self, where: str) -> None:
        for key in ("low", "high"):
            if getattr(self, key) is not None:
                raise ConfigError(f"{where}.{key}: not used by choice (give values = [...])")
        if not isinstance(self.values, (list, tuple)) or not self.values:
            raise ConfigError(f"{where}.values: expected a non-empty list, got {self.values!r}")
        for i, value in enumerate(self.values):
            if not _is_json_value(value):
                raise ConfigError(f"{where}.values[{i}]: {value!r} is not a JSON value (string, number, bool, list)")
        object.__setattr__(self, "values", tuple(self.values))

    def _check_range(self, where: str) -> None:
        if self.values:
            raise ConfigError(f"{where}.values: only used by choice (give low and high)")
        for key in ("low", "high"):
            value = getattr(self, key)
            if value is None:
                raise ConfigError(f"{where}.{key}: missing")
            if self.integer and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{where}.{key}: {self.dist} needs an integer, got {value!r}")
            _number(value, f"{where}.{key}")
        if self.low >= self.high:
            raise ConfigError(f"{where}: low must be below high, got low={self.low!r}, high={self.high!r}")
        if self.log and self.low <= 0:
            raise ConfigError(f"{where}.low: {self.dist} needs low > 0, got {self.low!r}")

    @property
    def log(self) -> bool:
        """True when the field is sampled uniformly in log10 space."""
        return self.dist in ("loguniform", "logint")

    @property
    def integer(self) -> bool:
        return self.dist in ("int", "logint")

    def _scale(self, value: float) -> float:
        return math.log10(value) if self.log else float(value)

    def sample(self, rng: np.random.Generator) -> Any:
        """One value drawn with ``rng``, as a JSON-safe Python value (int for int/logint, float for the rest).

        logint draws k = floor(exp(uniform(ln low, ln(high + 1)))), so P(k) is proportional to ln((k+1)/k).
        """
        if self.dist == "choice":
            return copy.deepcopy(self.values[int(rng.integers(len(self.values)))])
        if self.dist == "int":
            return int(rng.integers(self.low, self.high, endpoint=True))
        if self.dist == "logint":
            return min(int(math.exp(rng.uniform(math.log(self.low), math.log(self.high + 1)))), self.high)
        value = self.from_unit(float(rng.random()))
        return min(max(value, float(self.low)), float(self.high))

    def to_unit(self, value: Any) -> float:
        """Position of ``value`` in [0, 1] in the sampled scale (ConfigError for a choice value not listed)."""
        if self.dist == "choice":
            if value not in self.values:
                raise ConfigError(f"space.{self.name}: {value!r} is not one of the choices")
            return self.values.index(value) / (len(self.values) - 1) if len(self.values) > 1 else 0.5
        low, high = self._scale(self.low), self._scale(self.high)
        return (self._scale(value) - low) / (high - low)

    def from_unit(self, u: float) -> Any:
        """The value at position ``u`` in the sampled scale (rounded for int/logint; nearest choice)."""
        if self.dist == "choice":
            return copy.deepcopy(self.values[round(u * (len(self.values) - 1))])
        low, high = self._scale(self.low), self._scale(self.high)
        x = low + u * (high - low)
        value = 10.0**x if self.log else x
        return int(round(value)) if self.integer else float(value)

    def to_dict(self) -> dict[str, Any]:
        """The TOML/JSON table form, e.g. {"dist": "loguniform", "low": 1e-4, "high": 0.1}."""
        when = {"when": {key: copy.deepcopy(list(values)) for key, values in self.when}} if self.when else {}
        if self.dist == "choice":
            return {"dist": "choice", "values": copy.deepcopy(list(self.values)), **when}
        return {"dist": self.dist, "low": self.low, "high": self.high, **when}


@dataclass(frozen=True)
class StageConfig:
    """One stage: epoch budget, trial count, and how it starts from the previous stage.

    method "random" samples the space afresh (the first stage always does); "narrow" samples ranges
    narrowed to the previous stage's best trials (``top`` of them, else the best ``quantile`` fraction,
    widened by ``pad`` of the range on each side); "promote" continues the previous stage's ``top`` best
    trials (so ``trials == top``) to this stage's ``epochs`` or, with ``quantile``, the best fraction of those
    that completed, at most ``top`` (successive halving: fewer when trials diverged); ``hedge`` of them (a
    fraction, default 0) are kept for the best trial of each bin of the learning rate and model size the
    leaders miss (master.hedge); its ``pool`` "all" (default "previous") ranks every earlier stage's completed
    trials that stopped at the previous stage's epochs, not only the previous stage's, so a second screen's
    trials compete with the first's leaders. The narrowing itself lives in master.stages.
    Within the stage, ``prune`` stops hopeless trials while they run: "asha" (asynchronous successive
    halving, rungs at ``rung * eta**k`` epochs), "median" (below the median of the others from epoch
    ``rung`` on) or "none"; master.pruning applies it.
    ``val_points`` (default: the solver's, 1) scores a fixed validation subset that many times per epoch in this
    stage's trials (nncore's ``val_points``), so a short stage leaves a curve, not one point per epoch.
    """

    name: str
    epochs: int
    trials: int
    method: str = "random"
    top: int | None = None
    quantile: float | None = None
    pad: float = 0.1
    prune: str = "asha"
    rung: int = 1
    eta: int = 3
    hedge: float = 0.0
    pool: str = "previous"
    val_points: int | None = None

    def __post_init__(self) -> None:
        _name(self.name, "stages")
        where = f"stages.{self.name}"
        _int(self.epochs, f"{where}.epochs", 1)
        check_trials(self.trials, f"{where}.trials")
        last = trial_id(self.name, self.trials - 1)
        if not NAME_RE.match(last):
            raise ConfigError(f"{where}: trial ids like {last!r} would exceed 64 characters; shorten the stage name")
        if self.method not in METHODS:
            raise ConfigError(f"{where}.method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        if self.top is not None:
            _int(self.top, f"{where}.top", 1)
        if self.quantile is not None and not 0 < _number(self.quantile, f"{where}.quantile") <= 1:
            raise ConfigError(f"{where}.quantile: expected a fraction in (0, 1], got {self.quantile!r}")
        if not 0 <= _number(self.pad, f"{where}.pad") < 1:
            raise ConfigError(f"{where}.pad: expected a fraction in [0, 1), got {self.pad!r}")
        if self.prune not in PRUNERS:
            raise ConfigError(f"{where}.prune: expected one of {', '.join(PRUNERS)}, got {self.prune!r}")
        _int(self.rung, f"{where}.rung", 1)
        _int(self.eta, f"{where}.eta", 2)
        if not 0 <= _number(self.hedge, f"{where}.hedge") <= 1:
            raise ConfigError(f"{where}.hedge: expected a fraction in [0, 1], got {self.hedge!r}")
        if self.hedge and self.method != "promote":
            raise ConfigError(f"{where}.hedge: only promote stages use it")
        if self.pool not in POOLS:
            raise ConfigError(f"{where}.pool: expected one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.pool != "previous" and self.method != "promote":
            raise ConfigError(f"{where}.pool: only promote stages use it")
        if self.val_points is not None and not 1 <= _int(self.val_points, f"{where}.val_points", 1) <= 100:
            raise ConfigError(f"{where}.val_points: expected an integer from 1 to 100, got {self.val_points!r}")
        getattr(self, f"_check_{self.method}")(where)

    def _check_random(self, where: str) -> None:
        for key in ("top", "quantile"):
            if getattr(self, key) is not None:
                raise ConfigError(f"{where}.{key}: only narrow and promote stages use it")

    def _check_narrow(self, where: str) -> None:
        if self.top is not None and self.quantile is not None:
            raise ConfigError(f"{where}: give top or quantile, not both")
        if self.top is None and self.quantile is None:
            object.__setattr__(self, "quantile", DEFAULT_QUANTILE)

    def _check_promote(self, where: str) -> None:
        if self.top is None:
            object.__setattr__(self, "top", self.trials)
        if self.top != self.trials:
            raise ConfigError(f"{where}.top: a promote stage continues its top trials, so trials must equal top "
                             f"(got trials={self.trials}, top={self.top})")

    def to_dict(self) -> dict[str, Any]:
        """The TOML/JSON table form (without the name, which is the table's key, and unset fields)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "name" and getattr(self, f.name) is not None}


@dataclass(frozen=True)
class WatchConfig:
    """How ``master watch`` polices running trials and workers (the ``[watch]`` table; master.monitor applies it)."""

    explode_factor: float = 3.0  # an epoch's loss above this many times the initial loss: DIVERGED
    stall_seconds: float = 900.0  # a running trial with no new epoch for this long: KILLED
    heartbeat_seconds: float = 25.0  # a busy worker silent this long is dead and its trial requeued
    fail_streak: int = 3  # a worker whose last this-many jobs failed is quarantined (shut down)
    max_retries: int = 2  # a FAILED trial is retried (on any worker) at most this many times
    stop_grace: float = 10.0  # seconds a cooperative stop may take before RQ's stop-job command follows
    poll_seconds: float = 2.0  # how often the watch loop looks

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            where = f"watch.{f.name}"
            if f.type == "int":
                _int(value, where, 1 if f.name == "fail_streak" else 0)
            elif _number(value, where) <= (1 if f.name == "explode_factor" else 0):
                raise ConfigError(f"{where}: expected a number above {1 if f.name == 'explode_factor' else 0}, "
                                 f"got {value!r}")
        if self.heartbeat_seconds < MIN_HEARTBEAT_SECONDS:
            raise ConfigError(f"watch.heartbeat_seconds: {self.heartbeat_seconds!r} is too short: workers beat every "
                              f"{WORKER_HEARTBEAT_SECONDS} s, so a healthy worker would look dead; give at least "
                              f"{MIN_HEARTBEAT_SECONDS:g}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def pooled_stages(stages: Sequence[StageConfig], i: int) -> list[StageConfig]:
    """The stages whose trials a promote stage ``stages[i]`` with ``pool = "all"`` ranks: every earlier stage that
    ends at the previous stage's epochs (the horizon it continues from), the previous one included."""
    return [s for s in stages[:i] if s.epochs == stages[i - 1].epochs]


# Successive halving by shares of the trials that completed, on one random screen (242 epochs at most, fewer when
# trials diverge): 32 trials x 1 epoch; the best half (at most 14) continued to 2 epochs; the best 4/5 of those
# (at most 12) to 10; the best half of those (at most 5) to 30. No pruning inside a stage and no narrowing: nothing
# is dropped on one epoch's ranking except the worse half, a slow starter is judged again at 2 and 10 epochs, and
# every rung shrinks with the trials that diverged, so the plan stays within a third of the epochs flat search
# spends on the same draws (benchmarks/RESULTS.md, "Coarse-to-fine vs flat random search", session 6).
DEFAULT_STAGES = (
    StageConfig("coarse", epochs=1, trials=32),
    StageConfig("short", epochs=2, trials=14, method="promote", quantile=0.5, prune="none"),
    StageConfig("medium", epochs=10, trials=12, method="promote", quantile=0.8, prune="none"),
    StageConfig("fine", epochs=30, trials=5, method="promote", quantile=0.5, prune="none"),
)
_BUILTIN_DATASETS = tuple(k for k in DATASETS if ":" not in k)
_FILE_DATASETS = tuple(k.partition(":")[0] for k in DATASETS if ":" in k)


def check_dataset_name(name: Any) -> str:
    """Check the shape of a dataset name (known prefix, argument where one is needed) without loading it."""
    if isinstance(name, str):
        kind, colon, arg = name.partition(":")
        if (kind in _BUILTIN_DATASETS and not colon) or (kind in _FILE_DATASETS and arg):
            return name
    kinds = _BUILTIN_DATASETS + _FILE_DATASETS
    kind = name.partition(":")[0] if isinstance(name, str) else None
    hint = did_you_mean(kind, kinds) if kind is not None and kind not in kinds else ""
    raise ConfigError(f"experiment.dataset: {name!r} is not a dataset name{hint} (known: {', '.join(DATASETS)})")


@dataclass(frozen=True)
class ExperimentConfig:
    """A validated experiment: settings, fixed model/solver/data fields, ordered stages and the search space.

    A field both fixed (``model``/``solver``) and sampled (``space``) is allowed: the sampled value wins,
    the fixed one must still be valid on its own.
    """

    name: str
    dataset: str = "digits"
    seed: int = 0
    keep: int = 3
    sanity: bool = False
    data: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    solver: dict[str, Any] = field(default_factory=dict)
    stages: tuple[StageConfig, ...] = DEFAULT_STAGES
    space: tuple[Distribution, ...] = ()
    watch: WatchConfig = field(default_factory=WatchConfig)

    def __post_init__(self) -> None:
        _name(self.name, "experiment.name")
        check_dataset_name(self.dataset)
        _int(self.seed, "experiment.seed", 0)
        _int(self.keep, "experiment.keep", 1)
        if not isinstance(self.sanity, bool):
            raise ConfigError(f"experiment.sanity: expected true or false, got {self.sanity!r}")
        for key in ("data", "model", "solver"):
            if not isinstance(getattr(self, key), dict):
                raise ConfigError(f"{key}: expected a table, got {getattr(self, key)!r}")
        if "epochs" in self.solver:
            raise ConfigError("solver.epochs: set per stage ([stages.<name>] epochs), not in [solver]")
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "space", tuple(self.space))
        if not isinstance(self.watch, WatchConfig):
            raise ConfigError(f"watch: expected a WatchConfig, got {self.watch!r}")
        self._check_stages()
        self._check_space()
        self._check_specs()
        self._check_conditions()

    def _check_stages(self) -> None:
        if not self.stages or not all(isinstance(s, StageConfig) for s in self.stages):
            raise ConfigError(f"stages: expected at least one stage, got {self.stages!r}")
        names = [s.name for s in self.stages]
        for i, (prev, stage) in enumerate(zip((None, *self.stages), self.stages)):
            where = f"stages.{stage.name}"
            if stage.name in names[:i]:
                raise ConfigError(f"{where}: defined twice")
            if prev is None:
                if stage.method != "random":
                    raise ConfigError(f"{where}.method: the first stage samples at random; "
                                     f"{stage.method} needs a previous stage")
                continue
            if stage.pool == "all":
                pooled = pooled_stages(self.stages, i)
                if stage.top is not None and stage.top > (most := sum(s.trials for s in pooled)):
                    raise ConfigError(f"{where}.top: {stage.top} exceeds the {most} trials "
                                     f"of stages {', '.join(s.name for s in pooled)}")
            elif stage.top is not None and stage.top > prev.trials:
                raise ConfigError(f"{where}.top: {stage.top} exceeds the {prev.trials} trials of stage {prev.name}")
            if stage.method == "promote" and stage.epochs <= prev.epochs:
                raise ConfigError(f"{where}.epochs: a promote stage continues stage {prev.name} (epochs = "
                                 f"{prev.epochs}), so it needs more epochs, got {stage.epochs}")

    def _check_space(self) -> None:
        seen = set()
        for dist in self.space:
            if not isinstance(dist, Distribution):
                raise ConfigError(f"space: expected Distribution objects, got {dist!r}")
            section, _, key = dist.name.partition(".")
            if section not in SAMPLED_FIELDS:
                raise ConfigError(f"space.{section}: unknown section (known: {', '.join(SAMPLED_FIELDS)})")
            if key == "epochs" and section == "solver":
                raise ConfigError("space.solver.epochs: epochs come from the stage ([stages.<name>] epochs)")
            if key not in SAMPLED_FIELDS[section]:
                raise ConfigError(f"space.{dist.name}: unknown {section} field"
                                  f"{did_you_mean(key, SAMPLED_FIELDS[section])} "
                                  f"(known: {', '.join(SAMPLED_FIELDS[section])})")
            if dist.name in seen:
                raise ConfigError(f"space.{dist.name}: sampled twice")
            seen.add(dist.name)

    def _check_conditions(self) -> None:
        """Each condition names another model or solver field, with values nncore accepts for it."""
        for dist in self.space:
            self._check_when(dist)

    def _check_when(self, dist: Distribution) -> None:
        known = [f"{section}.{key}" for section, keys in SAMPLED_FIELDS.items() for key in keys]
        choices = {d.name: d.values for d in self.space if d.dist == "choice"}
        for key, values in dist.when:
            where = f'space.{dist.name}.when."{key}"'
            if key not in known:
                raise ConfigError(f"{where}: unknown field{did_you_mean(key, known)}")
            if key == dist.name:
                raise ConfigError(f"{where}: a parameter cannot depend on itself")
            for value in values:
                try:
                    self.trial_spec(self.stages[0].name, 0, 0, {key: value})
                except SpecError as exc:
                    raise ConfigError(f"{where}: {value!r} is rejected{did_you_mean(value, choices.get(key, ()))}: "
                                      f"{exc}") from None

    def _check_specs(self) -> None:
        """Build TrialSpecs so nncore validates the fixed fields, then each sampled field at probe values."""
        first = self.stages[0].name
        try:
            self.trial_spec(first, 0, 0, {})
        except SpecError as exc:
            raise ConfigError(str(exc)) from None
        for dist in self.space:
            probes = dist.values if dist.dist == "choice" else tuple(dist.from_unit(u) for u in _PROBE_UNITS)
            for value in probes:
                try:
                    self.trial_spec(first, 0, 0, {dist.name: value})
                except SpecError as exc:
                    raise ConfigError(f"space.{dist.name}: {value!r} is rejected: {exc}") from None

    def stage(self, name: str) -> StageConfig:
        """The stage called ``name``; ConfigError naming the known stages when there is none."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        names = [s.name for s in self.stages]
        raise ConfigError(f"stage {name!r}: not in experiment {self.name}{did_you_mean(name, names)} "
                         f"(stages: {', '.join(names)})")

    def trial_spec(self, stage: str, index: int, seed: int, params: dict[str, Any],
                   parent: str | None = None) -> TrialSpec:
        """The TrialSpec of trial ``index`` of ``stage``: fixed fields overridden by ``params`` (dotted names).

        Raises SpecError (from worker.spec) when nncore rejects the combination.
        """
        sections = copy.deepcopy({"model": self.model, "solver": self.solver})
        if self.stage(stage).val_points is not None:
            sections["solver"]["val_points"] = self.stage(stage).val_points
        for dotted, value in params.items():
            section, _, key = dotted.partition(".")
            sections[section][key] = copy.deepcopy(value)
        return TrialSpec(experiment=self.name, trial_id=trial_id(stage, index), stage=stage, dataset=self.dataset,
                         model=sections["model"], solver=sections["solver"], epochs=self.stage(stage).epochs,
                         seed=seed, params=copy.deepcopy(params), data=copy.deepcopy(self.data),
                         sanity=self.sanity, keep=self.keep, parent=parent)

    def to_dict(self) -> dict[str, Any]:
        """The config in its TOML shape (JSON-safe); ``config_from_dict`` reads it back to an equal config."""
        space: dict[str, dict[str, Any]] = {}
        for dist in self.space:
            section, _, key = dist.name.partition(".")
            space.setdefault(section, {})[key] = dist.to_dict()
        return {
            "experiment": {key: getattr(self, key) for key in EXPERIMENT_KEYS},
            **copy.deepcopy({"data": self.data, "model": self.model, "solver": self.solver}),
            "stages": {stage.name: stage.to_dict() for stage in self.stages},
            "space": space,
            "watch": self.watch.to_dict(),
        }


def _table(doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table, got {value!r}")
    return value


def _check_keys(table: dict[str, Any], known: tuple[str, ...], where: str, what: str = "key") -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{where}{key}: unknown {what}{did_you_mean(key, known)} (known: {', '.join(known)})")


def _stage(name: str, table: Any, first: bool) -> StageConfig:
    where = f"stages.{name}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {table!r}")
    _check_keys(table, STAGE_KEYS, f"{where}.")
    method = table.get("method", "random" if first else "narrow")
    trials = table.get("trials", table.get("top") if method == "promote" else None)
    for key, value in (("epochs", table.get("epochs")), ("trials", trials)):
        if value is None:
            raise ConfigError(f"{where}.{key}: missing")
    return StageConfig(name, **{**table, "method": method, "trials": trials})


def _space(table: dict[str, Any]) -> tuple[Distribution, ...]:
    dists = []
    for section, entries in table.items():
        if section not in SAMPLED_FIELDS:
            raise ConfigError(f"space.{section}: unknown section (known: {', '.join(SAMPLED_FIELDS)})")
        if not isinstance(entries, dict):
            raise ConfigError(f"space.{section}: expected a table, got {entries!r}")
        for key, spec in entries.items():
            where = f"space.{section}.{key}"
            if not isinstance(spec, dict):
                raise ConfigError(f'{where}: expected a table like {{ dist = "uniform", low = 0.0, high = 1.0 }}, '
                                 f"got {spec!r}")
            _check_keys(spec, DISTRIBUTION_KEYS, f"{where}.")
            if "dist" not in spec:
                raise ConfigError(f"{where}.dist: missing (one of {', '.join(DISTRIBUTIONS)})")
            dists.append(Distribution(f"{section}.{key}", spec["dist"], spec.get("low"), spec.get("high"),
                                      spec.get("values", ()), _when_table(spec.get("when", {}), where)))
    return tuple(dists)


def _when_table(table: Any, where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f'{where}.when: expected a table like {{ "solver.update" = ["adam"] }}, got {table!r}')
    return table


def _watch(table: dict[str, Any]) -> WatchConfig:
    _check_keys(table, tuple(f.name for f in fields(WatchConfig)), "watch.")
    return WatchConfig(**table)


def config_from_dict(doc: dict[str, Any]) -> ExperimentConfig:
    """Validate a parsed config document (the TOML's tables, or ``ExperimentConfig.to_dict()``)."""
    if not isinstance(doc, dict):
        raise ConfigError(f"config: expected a table, got {doc!r}")
    _check_keys(doc, SECTIONS, "", "section")
    if "experiment" not in doc:
        raise ConfigError("experiment: missing table [experiment] (with at least name = ...)")
    experiment = _table(doc, "experiment", "experiment")
    _check_keys(experiment, EXPERIMENT_KEYS, "experiment.")
    if "name" not in experiment:
        raise ConfigError("experiment.name: missing (every experiment needs a name)")
    stages = _table(doc, "stages", "stages")
    return ExperimentConfig(
        **experiment,
        data=_table(doc, "data", "data"),
        model=_table(doc, "model", "model"),
        solver=_table(doc, "solver", "solver"),
        stages=tuple(_stage(name, t, i == 0) for i, (name, t) in enumerate(stages.items())) or DEFAULT_STAGES,
        space=_space(_table(doc, "space", "space")),
        watch=_watch(_table(doc, "watch", "watch")),
    )


def _check_size(size: int, source: str) -> None:
    """ConfigError unless a config of ``size`` bytes is within MAX_CONFIG_BYTES (refused before parsing)."""
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: config larger than {MAX_CONFIG_BYTES // 1024} KiB; a search config is a few KiB")


def parse_config(text: str, source: str = "<config>") -> ExperimentConfig:
    """Parse TOML ``text`` into a validated config; syntax errors read "<source>: invalid TOML at line N: ..."."""
    _check_size(len(text.encode("utf-8", "surrogatepass")), source)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = _TOML_POSITION.match(str(exc))
        if match is None:
            raise ConfigError(f"{source}: invalid TOML: {exc}") from None
        line = match["line"] or str(text.rstrip("\n").count("\n") + 1)
        column = f" (column {match['column']})" if match["column"] else " (at end of file)"
        raise ConfigError(f"{source}: invalid TOML at line {line}: {match['msg']}{column}") from None
    return config_from_dict(doc)


def load_config(path: str | PathLike[str] | None = None) -> ExperimentConfig:
    """Load and validate the config file at ``path``; None loads the built-in default (digits MLP)."""
    if path is None:
        text = resources.files("master").joinpath(DEFAULT_CONFIG).read_text(encoding="utf-8")
        return parse_config(text, f"master/{DEFAULT_CONFIG}")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from None
    _check_size(len(raw), str(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_config(text, str(path))
