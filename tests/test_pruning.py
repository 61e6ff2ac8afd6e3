"""Tests for the stopping rules, closed-form cases: divergence, stall, ASHA rungs and cut-off, median rule."""
import math

import pytest

from master.pruning import Rule, TrialView, asha_cut, median_cut, should_kill
from master.config import StageConfig, WatchConfig
from worker.states import TrialState

NOW = 1000.0


def view(tid, scores, times=None, **kw):
    """A trial whose best-so-far accuracy after epoch e is scores[e-1], epoch e ending at times[e-1]."""
    return TrialView(tid, tuple(scores), tuple(times or [float(e) for e in range(1, len(scores) + 1)]),
                     updated=kw.pop("updated", NOW), **kw)


def test_rungs_are_geometric_below_the_budget_and_above_promoted_epochs():
    assert Rule(epochs=30).rungs() == [1, 3, 9, 27]
    assert Rule(epochs=30, start=5).rungs() == [9, 27]
    assert Rule(epochs=20, rung=2, eta=2).rungs() == [2, 4, 8, 16]
    assert Rule(epochs=1).rungs() == []  # off for one-epoch stages
    assert Rule(epochs=3).rungs() == [1]


def test_rule_of_a_stage_and_the_watch_settings():
    stage, watch = StageConfig("m", 9, 4, prune="median", rung=2, eta=4), WatchConfig(explode_factor=5, stall_seconds=7)
    rule = Rule.of(stage, watch)
    assert rule == Rule(9, "median", 2, 4, 0, 5, 7)


def test_divergence_non_finite_and_exploded_loss():
    rule = Rule(epochs=5)
    v = should_kill(view("a", [0.5], last_loss=math.nan, initial_loss=2.3), [], rule, NOW)
    assert v.state is TrialState.DIVERGED and v.reason == "non-finite loss at epoch 1"
    v = should_kill(view("a", [0.5, 0.5], last_loss=7.0, initial_loss=2.0), [], rule, NOW)
    assert v.state is TrialState.DIVERGED
    assert v.reason == "loss 7 exceeded 3x initial loss 2 at epoch 2"
    assert should_kill(view("a", [0.5], last_loss=6.0, initial_loss=2.0), [], rule, NOW) is None  # exactly 3x


def test_stall():
    rule = Rule(epochs=5, stall_seconds=60)
    assert should_kill(view("a", [0.5], updated=NOW - 59), [], rule, NOW) is None
    v = should_kill(view("a", [0.5], updated=NOW - 61), [], rule, NOW)
    assert v.state is TrialState.KILLED and v.reason.startswith("stalled: no progress for 61 s")


def test_asha_cuts_the_bottom_of_those_that_reached_the_rung_first():
    rule = Rule(epochs=9)  # rungs 1, 3
    peers = [view("p1", [0.5], [1.0]), view("p2", [0.6], [2.0])]
    # values [0.5, 0.6, 0.55]: the 66.7th percentile is 0.55 + (4/3 - 1) * 0.05 = 0.5667
    reason = asha_cut(view("t", [0.55], [3.0]), peers, rule)
    assert reason == "below the rung cut-off at epoch 1: val acc 0.5500 < 0.5667 (top 1/3 of 3 trials continue)"
    assert asha_cut(view("t", [0.6], [3.0]), peers, rule) is None
    # a peer that reached the rung after the trial did does not count: two values are too few to cut
    assert asha_cut(view("t", [0.55], [1.5]), peers, rule) is None
    verdict = should_kill(view("t", [0.55], [3.0]), peers, rule, NOW)
    assert verdict.state is TrialState.KILLED and verdict.reason.startswith("below the rung cut-off")


def test_asha_first_arrivals_pass_and_later_rungs_are_judged():
    rule = Rule(epochs=9)
    assert asha_cut(view("t", [0.1]), [], rule) is None
    peers = [view("p1", [0.5, 0.6, 0.9]), view("p2", [0.5, 0.6, 0.8])]
    trial = view("t", [0.7, 0.7, 0.7], [10.0, 11.0, 12.0])  # best at rung 1, worst at rung 3
    assert asha_cut(trial, peers, rule).startswith("below the rung cut-off at epoch 3")


def test_asha_off_and_one_epoch_stage():
    peers = [view("p1", [0.9]), view("p2", [0.9])]
    assert should_kill(view("t", [0.1], [5.0]), peers, Rule(epochs=9, prune="none"), NOW) is None
    assert should_kill(view("t", [0.1], [5.0]), peers, Rule(epochs=1), NOW) is None


def test_median_rule():
    rule = Rule(epochs=9, prune="median", rung=2)
    peers = [view("a", [0.5, 0.5]), view("b", [0.6, 0.6]), view("c", [0.7, 0.7])]
    assert median_cut(view("t", [0.55]), peers, rule) is None  # before epoch `rung`
    assert median_cut(view("t", [0.55, 0.55]), peers, rule) == \
        "below the median at epoch 2: val acc 0.5500 < 0.6000 of 3 trials"
    assert median_cut(view("t", [0.65, 0.65]), peers, rule) is None
    assert median_cut(view("t", [0.55, 0.55]), peers[:2], rule) is None  # too few peers


def test_view_from_history_keeps_the_best_so_far_and_stops_at_a_gap():
    history = [{"epoch": 1, "val_acc": 0.5, "time": 10.0}, {"epoch": 2, "val_acc": 0.4, "time": 11.0},
               {"epoch": 3, "val_acc": 0.7}, {"epoch": 5, "val_acc": 0.9, "time": 13.0}]
    v = TrialView.from_history("t", history, {"last_loss": 1.5, "initial_loss": "2.3", "updated": 99})
    assert v.scores == (0.5, 0.5, 0.7) and v.times == (10.0, 11.0, math.inf)
    assert (v.epoch, v.last_loss, v.initial_loss, v.updated) == (3, 1.5, 2.3, 99.0)
    assert TrialView.from_history("t", []).last_loss is None


@pytest.mark.parametrize("prune", ["asha", "median", "none"])
def test_a_trial_alone_is_never_cut(prune):
    assert should_kill(view("t", [0.1, 0.1, 0.1]), [], Rule(epochs=9, prune=prune), NOW) is None
