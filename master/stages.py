"""Stages of a coarse-to-fine search: each stage's trials (sampled, narrowed or promoted) and when a stage is done."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from master.borders import BorderFlag, analyse, best_count, top_trials
from master.hedge import hedged_top
from master.sampler import sample_trials
from master.config import (DEFAULT_QUANTILE, ConfigError, Distribution, ExperimentConfig, StageConfig,
                           check_trials)
from worker.records import StageRecord, TrialResult
from worker.spec import SpecError, TrialSpec
from worker.states import TrialState
from worker.store import ExperimentStore

DEFAULT_PAD = StageConfig.__dataclass_fields__["pad"].default


@dataclass(frozen=True)
class Ranked:
    """A finished trial of a stage, as narrowing and promotion see it: its spec and its outcome."""

    spec: dict[str, Any]
    result: TrialResult

    @property
    def trial_id(self) -> str:
        return self.result.trial_id

    @property
    def val_acc(self) -> float:
        return self.result.best_val_acc


@dataclass(frozen=True)
class StagePlan:
    """What launching a stage enqueues, the ranges it samples and, for narrow, how they changed."""

    stage: StageConfig
    specs: tuple[TrialSpec, ...]
    space: tuple[Distribution, ...]
    previous: str | None = None
    ranges: tuple[tuple[Distribution, Distribution], ...] = ()  # narrow: (old, new) for every parameter
    flags: tuple[BorderFlag, ...] = ()  # the previous stage's
    note: str = ""


def previous_stage(config: ExperimentConfig, name: str) -> StageConfig | None:
    """The stage before ``name`` in the config, None for the first."""
    names = [s.name for s in config.stages]
    i = names.index(config.stage(name).name)
    return config.stages[i - 1] if i else None


def next_stage(config: ExperimentConfig, name: str) -> StageConfig | None:
    names = [s.name for s in config.stages]
    i = names.index(config.stage(name).name)
    return config.stages[i + 1] if i + 1 < len(names) else None


def launched_stages(store: ExperimentStore, config: ExperimentConfig) -> list[StageRecord]:
    """The records of the config's stages that have been launched, in the config's order."""
    records = (store.read_stage(stage.name) for stage in config.stages)
    return [r for r in records if r is not None and r.trial_ids]


def stage_trials(store: ExperimentStore, name: str) -> tuple[str, ...]:
    """The trial ids recorded for stage ``name`` (empty when it was never launched)."""
    record = store.read_stage(name)
    return record.trial_ids if record is not None else ()


def stage_space(store: ExperimentStore, config: ExperimentConfig, name: str) -> tuple[Distribution, ...]:
    """The ranges stage ``name`` sampled: those recorded in stages/<name>.json, else the config's space."""
    record = store.read_stage(name)
    ranges = record.ranges if record is not None else None
    if not ranges:
        return config.space
    return tuple(dataclasses.replace(d, dist=r["dist"], low=r.get("low"), high=r.get("high"),
                                     values=tuple(r.get("values", ())))
                 if isinstance(r := ranges.get(d.name), dict) else d for d in config.space)


def best_first(trials: list[Ranked]) -> list[Ranked]:
    """Trials by validation accuracy, best first (ties by trial id)."""
    return sorted(trials, key=lambda r: (-r.val_acc, r.trial_id))


def ranked(store: ExperimentStore, stage: str) -> list[Ranked]:
    """The stage's trials with a result (COMPLETED, KILLED or DIVERGED), best validation accuracy first."""
    out = []
    for tid, spec in store.iter_trials():
        if spec.get("stage") != stage:
            continue
        result = store.read_result(tid)
        if result is not None and result.state.ranked:
            out.append(Ranked(spec, result))
    return best_first(out)


def evidence(store: ExperimentStore, config: ExperimentConfig, name: str) -> list[Ranked]:
    """What narrowing after stage ``name`` ranks: its trials with a result and, when it is a promote stage, those of
    the stages it promoted from that it did not continue (recursively); every configuration once, at the longest
    horizon it reached, best first. So narrowing after a promotion judges the whole screen by the promoted
    trials' longer evidence, not only the few promoted (all leaders of the screen, whose spread says little)."""
    out = ranked(store, name)
    before = previous_stage(config, name)
    if config.stage(name).method == "promote" and before is not None:
        continued = {r.spec.get("parent") for r in out}
        out += [r for r in evidence(store, config, before.name) if r.trial_id not in continued]
    return best_first(out)


def pool(store: ExperimentStore, config: ExperimentConfig, name: str) -> list[Ranked]:
    """What a promote stage ``name`` with ``pool = "all"`` ranks: the trials of every stage before it that
    stopped at the previous stage's epochs (the horizon it continues from) and were not continued already, best
    first."""
    before = previous_stage(config, name)
    names = [s.name for s in config.stages]
    earlier = [r for s in names[:names.index(name)] for r in ranked(store, s)]
    continued = {r.spec.get("parent") for r in earlier}
    out = [r for r in earlier if r.result.epochs_done == before.epochs and r.trial_id not in continued]
    return best_first(out)


def selection(config: ExperimentConfig, name: str) -> tuple[int | None, float | None, float]:
    """(top, quantile, pad) that judge stage ``name``'s best trials: the next stage's if it narrows,
    else the defaults (best 20%, padded by 10% of the range)."""
    after = next_stage(config, name)
    if after is not None and after.method == "narrow":
        return after.top, after.quantile, after.pad
    return None, DEFAULT_QUANTILE, DEFAULT_PAD


def validator(config: ExperimentConfig, stage: str) -> Any:
    """``valid(name, value)``: whether nncore accepts ``value`` for the sampled field ``name``."""
    def valid(name: str, value: Any) -> bool:
        try:
            config.trial_spec(stage, 0, 0, {name: value})
        except SpecError:
            return False
        return True
    return valid


def border_flags(store: ExperimentStore, config: ExperimentConfig, name: str) -> list[BorderFlag]:
    """Border flags of stage ``name`` from its finished trials so far (live while it runs)."""
    top, quantile, pad = selection(config, name)
    everyone = [(r.spec.get("params", {}), r.val_acc) for r in evidence(store, config, name)]
    best = top_trials(everyone, top, quantile)
    if not best:
        return []
    return analyse(best, everyone, stage_space(store, config, name), pad, validator(config, name))[1]


def flag_messages(flags: list[BorderFlag], space: tuple[Distribution, ...], last: bool = False) -> list[str]:
    """What each flag says; after the ``last`` stage, its advice is for the next search (no stage acts on it)."""
    dists = {d.name: d for d in space}
    messages = [f.message(dists[f.name]) for f in flags if f.name in dists]
    return [m.replace(" -> widen to ", " -> for your next search, widen to ") for m in messages] if last else messages


def plan_stage(store: ExperimentStore, config: ExperimentConfig, name: str, seed: int | None = None,
               trials: int | None = None) -> StagePlan:
    """The trials of stage ``name``: sampled from the config's space (random), from ranges narrowed around
    the previous stage's best trials (narrow), or the previous stage's best trials continued (promote).
    Deterministic given storage, the config and ``seed``, so planning again gives the same trials."""
    stage = config.stage(name)
    if trials is not None:
        check_trials(trials, "--trials")
    seed = config.seed if seed is None else seed
    before = previous_stage(config, name)
    if stage.method == "random" or before is None:
        return StagePlan(stage, tuple(sample_trials(config, name, trials or stage.trials, seed)), config.space)
    if stage_trials(store, name):
        return _resume(store, config, stage, before, seed, trials)
    done = ranked(store, before.name)
    if not done:
        raise ConfigError(f"stage {name}: stage {before.name} has no finished trial to {stage.method} from")
    if stage.method == "promote":
        if stage.pool == "all":
            done = pool(store, config, name)
        return _promote(store, config, stage, before, done, trials, stage_space(store, config, before.name))
    return _narrow(store, config, stage, before, evidence(store, config, before.name), seed, trials)


def _narrow(store: ExperimentStore, config: ExperimentConfig, stage: StageConfig, before: StageConfig,
            done: list[Ranked], seed: int, trials: int | None) -> StagePlan:
    old = stage_space(store, config, before.name)
    everyone = [(r.spec.get("params", {}), r.val_acc) for r in done]
    best = top_trials(everyone, stage.top, stage.quantile)
    new, flags = analyse(best, everyone, old, stage.pad, validator(config, stage.name))
    try:
        narrowed = dataclasses.replace(config, space=new)
    except ConfigError as exc:
        raise ConfigError(f"stage {stage.name}: the narrowed ranges are rejected: {exc}") from None
    specs = sample_trials(narrowed, stage.name, trials or stage.trials, seed)
    source = f"stage {before.name}" + (" and the trials it did not promote" if before.method == "promote" else "")
    note = f"ranges from the best {len(best)} of {len(done)} finished trials of {source}:"
    return StagePlan(stage, tuple(specs), new, before.name, tuple(zip(old, new)), tuple(flags), note)


def _resume(store: ExperimentStore, config: ExperimentConfig, stage: StageConfig, before: StageConfig, seed: int,
            trials: int | None) -> StagePlan:
    """A narrow or promote stage launched before: its recorded ranges (narrow) or trials (promote), not
    derived again from a previous stage that may have changed since, so launching again adds no trial."""
    space = stage_space(store, config, stage.name)
    note = f"resuming stage {stage.name} as first launched from stage {before.name}"
    if stage.method == "narrow":
        specs = sample_trials(dataclasses.replace(config, space=space), stage.name, trials or stage.trials, seed)
        return StagePlan(stage, tuple(specs), space, before.name, note=note + " (its recorded ranges)")
    specs = tuple(TrialSpec.from_dict(store.read_spec(tid)) for tid in stage_trials(store, stage.name))
    return StagePlan(stage, specs, space, before.name, note=note)


def continued_acc(store: ExperimentStore, trial: Ranked) -> float:
    """The validation accuracy of the network a promotion continues: the trial's last epoch (its latest checkpoint,
    which the promoted trial resumes from), else its best when no history is left."""
    history = store.read_history(trial.trial_id)
    last = history[-1].get("val_acc") if history else None
    return float(last) if isinstance(last, (int, float)) and not isinstance(last, bool) else trial.val_acc


def promoted(completed: list[Ranked], scores: list[float], k: int, hedge: float, space: tuple[Distribution, ...]
             ) -> list[Ranked]:
    """The ``k`` trials to promote from ``completed`` by ``scores`` (best first), ``hedge`` of them kept for the
    best of each learning-rate and model-size bin the leaders miss (master.hedge.hedged_top)."""
    order = sorted(range(len(completed)), key=lambda i: (-scores[i], completed[i].trial_id))
    if not hedge:
        return [completed[i] for i in order[:k]]
    chosen = hedged_top([(completed[i].spec.get("params", {}), scores[i]) for i in order], k, space, hedge)
    return [completed[order[i]] for i in chosen]


def _promote(store: ExperimentStore, config: ExperimentConfig, stage: StageConfig, before: StageConfig,
             done: list[Ranked], trials: int | None, space: tuple[Distribution, ...]) -> StagePlan:
    """The best completed trials of ``done`` continued, ranked by the accuracy of the epoch they continue from
    (their last, not their best: a promoted trial resumes from its latest checkpoint, and a network whose
    accuracy has since fallen back is not the one that continues)."""
    completed = [r for r in done if r.result.state is TrialState.COMPLETED]
    k = trials or stage.top
    if stage.quantile is not None:
        k = min(k, best_count(stage.quantile, len(completed)))
    chosen = promoted(completed, [continued_acc(store, r) for r in completed], k, stage.hedge, space)
    specs = tuple(config.trial_spec(stage.name, i, r.spec["seed"], r.spec.get("params", {}), parent=r.trial_id)
                  for i, r in enumerate(chosen))
    source = "every earlier stage" if stage.pool == "all" else f"stage {before.name}"
    share = f" (the best {stage.quantile:.0%}, at most {trials or stage.top})" if stage.quantile is not None else ""
    note = (f"the best {len(chosen)} of {len(completed)} completed trials of {source}{share} continue "
            f"from epoch {before.epochs} to {stage.epochs}"
            + (f" ({stage.hedge:.0%} of them the best of a learning-rate or model-size bin)" if stage.hedge else ""))
    return StagePlan(stage, specs, space, before.name, note=note)


@dataclass(frozen=True)
class StageProgress:
    """How far a stage's trials are: counts per state, trials still to run, failed trials still to retry."""

    counts: dict[str, int]
    unfinished: tuple[str, ...]
    retryable: tuple[str, ...]

    @property
    def finished(self) -> bool:
        return not self.unfinished and not self.retryable

    def describe(self) -> str:
        parts = [f"{n} {s}" for s, n in sorted(self.counts.items())]
        if self.retryable:
            parts.append(f"{len(self.retryable)} failed awaiting retry")
        return ", ".join(parts) or "no trials"


def retries(store: ExperimentStore, trial_id: str) -> int:
    """How often the master has retried a failed trial."""
    return sum(e.get("event") == "retry" for e in store.read_events(trial_id))


def stage_status(store: ExperimentStore, trial_ids: Sequence[str], max_retries: int) -> StageProgress:
    """Where the stage's trials stand, from shared storage alone."""
    counts: dict[str, int] = {}
    unfinished, retryable = [], []
    for tid in trial_ids:
        result = store.read_result(tid)
        if result is None or not result.terminal:
            state = "unfinished"
            unfinished.append(tid)
        else:
            state = result.state.value
            if result.state is TrialState.FAILED and retries(store, tid) < max_retries:
                retryable.append(tid)
        counts[state] = counts.get(state, 0) + 1
    return StageProgress(counts, tuple(unfinished), tuple(retryable))


def stage_completed(store: ExperimentStore, name: str, max_retries: int) -> bool:
    """Whether stage ``name`` has been launched and all its trials have finished (failed ones out of retries)."""
    ids = stage_trials(store, name)
    return bool(ids) and stage_status(store, ids, max_retries).finished
