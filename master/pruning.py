"""Pure rules that decide whether a running trial should be stopped: divergence, stall, rungs, median."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from master.config import StageConfig, WatchConfig
from nncore.solver import divergence
from worker.states import TrialState

MEDIAN_MIN_PEERS = 3  # the median rule needs this many other trials at an epoch before it judges


@dataclass(frozen=True)
class TrialView:
    """What the rules see of one trial: per-epoch best-so-far validation accuracy and when each epoch ended,
    plus the live losses and the time of its last progress report (None where unknown)."""

    trial_id: str
    scores: tuple[float, ...] = ()  # best validation accuracy up to epoch e, at index e - 1
    times: tuple[float, ...] = ()  # unix time epoch e ended, at index e - 1 (inf where unknown)
    last_loss: float | None = None
    initial_loss: float | None = None
    updated: float | None = None

    @property
    def epoch(self) -> int:
        return len(self.scores)

    @classmethod
    def from_history(cls, trial_id: str, history: Sequence[dict[str, Any]], progress: dict[str, Any] | None = None
                     ) -> TrialView:
        """Build from history.jsonl records (epochs 1..n, a gap ends it) and a Redis progress hash."""
        scores, times, best = [], [], -math.inf
        for n, record in enumerate(sorted(history, key=lambda r: r["epoch"]), 1):
            acc = record.get("val_acc")
            if record["epoch"] != n or not isinstance(acc, (int, float)):
                break
            best = max(best, float(acc))
            scores.append(best)
            times.append(float(record.get("time") or math.inf))
        progress = progress or {}
        return cls(trial_id, tuple(scores), tuple(times), _float(progress.get("last_loss")),
                   _float(progress.get("initial_loss")), _float(progress.get("updated")))


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Rule:
    """The stopping rule of one stage: ``prune`` ("asha" | "median" | "none") with rungs at ``rung * eta**k``
    epochs above ``start`` (epochs a promoted trial brings along) and below ``epochs``; divergence and stall."""

    epochs: int
    prune: str = "asha"
    rung: int = 1
    eta: int = 3
    start: int = 0
    explode_factor: float = 3.0
    stall_seconds: float = 900.0
    screen: int = 0  # the screen length: no rung before it

    @classmethod
    def of(cls, stage: StageConfig, watch: WatchConfig, start: int = 0, screen: int = 0) -> Rule:
        return cls(stage.epochs, stage.prune, stage.rung, stage.eta, start, watch.explode_factor, watch.stall_seconds,
                   screen)

    def rungs(self) -> list[int]:
        """Epochs at which ASHA judges a trial (the first not before the screen length); none in a one-epoch stage."""
        out, r = [], max(self.rung, self.screen)
        while r < self.epochs:
            if r > self.start:
                out.append(r)
            r *= self.eta
        return out


@dataclass(frozen=True)
class Verdict:
    """Stop the trial: the state it ends in and why."""

    state: TrialState
    reason: str


def should_kill(trial: TrialView, peers: Sequence[TrialView], rule: Rule, now: float) -> Verdict | None:
    """Whether a running ``trial`` must stop, judged against the other trials of its stage (``peers``)."""
    if trial.last_loss is not None and (why := divergence(trial.last_loss, trial.initial_loss, rule.explode_factor,
                                                          trial.epoch)) is not None:
        return Verdict(TrialState.DIVERGED, why)
    if trial.updated is not None and now - trial.updated > rule.stall_seconds:
        return Verdict(TrialState.KILLED, f"stalled: no progress for {now - trial.updated:.0f} s "
                                          f"(limit {rule.stall_seconds:g} s) at epoch {trial.epoch}")
    reason = {"asha": asha_cut, "median": median_cut}.get(rule.prune, lambda *_: None)(trial, peers, rule)
    return Verdict(TrialState.KILLED, reason) if reason else None


def asha_cut(trial: TrialView, peers: Sequence[TrialView], rule: Rule) -> str | None:
    """Asynchronous successive halving: at each rung the trial reached, compare it with the trials that
    reached that rung before it did; below the (1 - 1/eta) quantile of them all (itself included) it stops.
    The first eta - 1 trials at a rung pass (too few to cut), as in ASHA."""
    for rung in rule.rungs():
        if trial.epoch < rung:
            return None
        score, at = trial.scores[rung - 1], trial.times[rung - 1]
        values = [p.scores[rung - 1] for p in peers if p.epoch >= rung and p.times[rung - 1] <= at] + [score]
        if len(values) < rule.eta:
            continue
        cutoff = float(np.percentile(values, 100 * (1 - 1 / rule.eta)))
        if score < cutoff:
            return (f"below the rung cut-off at epoch {rung}: val acc {score:.4f} < {cutoff:.4f} "
                    f"(top 1/{rule.eta} of {len(values)} trials continue)")
    return None


def median_cut(trial: TrialView, peers: Sequence[TrialView], rule: Rule) -> str | None:
    """The median stopping rule: from epoch ``rung`` on, a trial whose best accuracy so far is below the
    median of the other trials' best at the same epoch stops (needs MEDIAN_MIN_PEERS of them)."""
    epoch = trial.epoch
    if epoch < max(rule.rung, rule.screen, rule.start + 1):
        return None
    others = [p.scores[epoch - 1] for p in peers if p.epoch >= epoch]
    if len(others) < MEDIAN_MIN_PEERS:
        return None
    median = float(np.median(others))
    score = trial.scores[epoch - 1]
    if score < median:
        return f"below the median at epoch {epoch}: val acc {score:.4f} < {median:.4f} of {len(others)} trials"
    return None
