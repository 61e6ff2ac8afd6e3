"""The epoch counting of benchmarks/staged_vs_flat.py, on hand-made accuracy curves."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import staged_vs_flat as bench  # noqa: E402

HIT_AT_3 = [0.1, 0.5, 0.9, 0.95]  # reaches 0.9 at its 3rd epoch
SLOW_START = [0.3, 0.6, 0.7, 0.92]  # best after one epoch, reaches 0.9 only at its 4th
NEVER = [0.2, 0.4, 0.5, 0.6]


def test_epochs_to_counts_every_epoch_trained_before_the_first_hit():
    assert bench.first_hit(HIT_AT_3, 0.9) == 3
    assert bench.first_hit(NEVER, 0.9) == 0
    assert bench.epochs_to([NEVER, HIT_AT_3], 0.9) == 4 + 3
    assert bench.epochs_to([HIT_AT_3, NEVER], 0.9) == 3
    assert bench.epochs_to([NEVER, NEVER], 0.9) == math.inf


def test_any_order_averages_over_the_orders_of_the_trials():
    # two orders, equally likely: 3 (the hit first) and 4 + 3 (after the miss)
    assert bench.expected_epochs_to([NEVER, HIT_AT_3], 0.9) == pytest.approx(5.0, abs=0.1)
    assert bench.expected_epochs_to([NEVER], 0.9) == math.inf


def test_replay_screens_one_epoch_then_continues_best_first():
    # screen: 3 epochs; SLOW_START ranks first (0.3) and reaches 0.9 three epochs later
    assert bench.replay([HIT_AT_3, SLOW_START, NEVER], 0.9) == 3 + 3
    # SLOW_START ranks first but never gets there: its 3 remaining epochs are spent before HIT_AT_3's 2
    slow_miss = [0.3, 0.6, 0.7, 0.8]
    assert bench.replay([HIT_AT_3, slow_miss], 0.9) == 2 + 3 + 2
    assert bench.replay([slow_miss, NEVER], 0.9) == math.inf


def test_perfect_pick_continues_only_the_trial_that_gets_there_soonest():
    assert bench.replay([NEVER, SLOW_START, HIT_AT_3], 0.9, perfect=True) == 3 + 2
    assert bench.replay([HIT_AT_3, [0.1, 0.2, 0.3, 0.4, 0.5, 0.91]], 0.9, perfect=True) == 2 + 2
    assert bench.replay([NEVER], 0.9, perfect=True) == math.inf


def test_a_hit_within_the_screen_ends_the_replay_there():
    first_epoch_hit = [0.95, 0.96]
    assert bench.replay([NEVER, first_epoch_hit, HIT_AT_3], 0.9) == 2
    assert bench.replay([NEVER, first_epoch_hit, HIT_AT_3], 0.9, perfect=True) == 2


def test_anytime_curve_holds_the_best_so_far_across_trials():
    np.testing.assert_array_equal(bench.anytime([[0.1, 0.3], [], [0.2, 0.5]]), [0.1, 0.3, 0.3, 0.5])
    # in points below the reference, held at its last value once the search has ended
    np.testing.assert_allclose(bench.gap_curve([[0.1, 0.3]], 0.5, 4), [-40, -20, -20, -20])
    # averaged over orders: half of them start with the 0.9 trial
    np.testing.assert_allclose(bench.gap_curve([[0.9], [0.1]], 0.9, 2, orders=400), [-40, 0], atol=4)


def test_a_ladder_reranks_at_every_rung():
    fast_start, late_winner, slow = [0.3, 0.4, 0.5, 0.6], [0.2, 0.5, 0.7, 0.95], [0.1, 0.2, 0.3, 0.4]
    trials = [slow, late_winner, fast_start]
    # screen 3; the best 2 after one epoch (fast_start, late_winner) to epoch 2: 2 more; then the best 1 by
    # then (late_winner, 0.5 > 0.4) on to epoch 4, reaching 0.9 at its 2nd epoch there
    assert bench.replay(trials, 0.9, ((2, 2), (1, 4))) == 3 + 2 + 2
    assert bench.replay(trials, 0.9, ((1, 4),)) == math.inf  # ranked once, after one epoch: the wrong one
    assert bench.replay(trials, 0.9) == 3 + 3 + 3  # all continued best first: fast_start's 3, then the hit


def test_the_benchmarks_default_plan_is_the_products_and_halving_by_shares_builds_it():
    from master.config import DEFAULT_STAGES, parse_config

    def stages(plan):
        task = bench.TASKS["digits"].format(name="x", seed=0, data="/d")
        return parse_config(task + plan + bench.SPACES["wide"]).stages
    assert stages(bench.default_stages(32)) == DEFAULT_STAGES
    shape = [(s.epochs, s.trials, s.method, s.quantile, s.prune) for s in DEFAULT_STAGES]
    default_rungs = ((1 / 2, 14, 2), (4 / 5, 12, 10), (1 / 2, 5, 30))
    assert [(s.epochs, s.trials, s.method, s.quantile, s.prune)
            for s in stages(bench.halving_q_stages(32, default_rungs))] == shape
    assert [s.trials for s in stages(bench.default_stages(64))] == [64, 28, 24, 10]


@pytest.mark.parametrize("draws, same", [("paired", True), ("independent", False)])
def test_paired_flat_search_trains_the_configurations_the_staged_search_screens(draws, same):
    from master.config import parse_config
    from master.sampler import sample_trials

    def first_stage(plan):
        config = parse_config(bench.TASKS["spiral6"].format(name="x", seed=3, data="/d") + plan
                              + bench.SPACES["wide"])
        return [(s.params, s.seed) for s in sample_trials(config, config.stages[0].name, 32)]
    flat = first_stage(bench.flat_stages(32, draws))
    for plan in bench.PLANS.values():
        staged = first_stage(plan(32))
        shared = min(len(flat), len(staged))
        assert (flat[:shared] == staged[:shared]) is same
