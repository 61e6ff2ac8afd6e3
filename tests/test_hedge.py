"""Hedges against short-horizon bias: the screen-length rule on synthetic curves, promotion with diversity."""
import math

import pytest

from master.config import Distribution
from master.hedge import bin_of, hedged_top, ranking_stable, screen_length, top_set

LR = Distribution("solver.lr", "loguniform", 1e-4, 1e-1)
HIDDEN = Distribution("model.hidden", "choice", values=([64], [128], [256, 128]))


def parallel(n=8, epochs=16):
    """Curves that never cross: trial i is better than trial j < i at every epoch."""
    return [[0.5 + 0.02 * i + 0.3 * (1 - 0.7 ** e) for e in range(1, epochs + 1)] for i in range(n)]


def crossing(n=8, epochs=16):
    """Curves that cross: trial i ends higher the larger i but learns more slowly, so the leaders change."""
    return [[(0.6 + 0.04 * i) * (1 - math.exp(-e / (0.5 + 0.6 * i))) for e in range(1, epochs + 1)] for i in range(n)]


def test_top_set_counts_ties_within_eps():
    assert top_set([0.5, 0.9, 0.8, 0.79], 2) == {1, 2}
    assert top_set([0.5, 0.9, 0.8, 0.79], 2, eps=0.015) == {1, 2, 3}
    assert top_set([], 3) == set()


def test_a_stable_ranking_stops_screening_at_the_first_rung():
    assert screen_length(parallel()) == 1
    assert ranking_stable([0.1, 0.2, 0.3, 0.4], [0.2, 0.3, 0.4, 0.5])


def test_crossing_curves_keep_screening_until_the_ranking_settles():
    curves = crossing()
    assert ranking_stable([c[0] for c in curves], [c[1] for c in curves])  # the early rungs agree with each other
    assert not ranking_stable([c[3] for c in curves], [c[15] for c in curves])
    assert screen_length(curves) == 8  # the best at epochs 1, 2 and 4 are not the best at 16; at 8 they are
    assert screen_length([c[:8] for c in curves]) is None  # nothing shorter agrees with epoch 8: keep screening


def test_screen_length_needs_two_trials_at_two_rungs():
    assert screen_length([[0.5, 0.6]]) is None
    assert screen_length([[0.5, 0.6], [0.4]]) is None


def test_bins_are_equal_parts_of_the_sampled_scale_or_a_choice_value():
    assert [bin_of(LR, v, 3) for v in (1e-4, 9e-4, 1.1e-3, 1e-2, 1e-1)] == [0, 0, 1, 2, 2]
    assert bin_of(HIDDEN, [256, 128], 3) == repr([256, 128])


def test_promotion_reserves_slots_for_the_best_of_bins_the_leaders_miss():
    # the four best all have a high lr and a small net; the best slow starter per bin must get the reserve
    trials = [({"solver.lr": 0.05, "model.hidden": [64]}, 0.95 - 0.01 * i) for i in range(4)]
    trials += [({"solver.lr": 3e-4, "model.hidden": [256, 128]}, 0.60),  # 4: low lr, large net
               ({"solver.lr": 4e-4, "model.hidden": [256, 128]}, 0.55),  # 5: same bins as 4, worse
               ({"solver.lr": 3e-3, "model.hidden": [128]}, 0.50)]  # 6: middle lr, middle net
    assert hedged_top(trials, 4, (LR, HIDDEN), reserve=0.0) == [0, 1, 2, 3]
    assert hedged_top(trials, 4, (LR, HIDDEN), reserve=0.5) == [0, 1, 4, 6]
    assert hedged_top(trials, 4, (LR, HIDDEN), reserve=0.25) == [0, 1, 2, 4]


def test_an_unused_reserve_goes_back_to_the_ranking():
    trials = [({"solver.lr": 0.05, "model.hidden": [64]}, 0.9 - 0.01 * i) for i in range(6)]
    assert hedged_top(trials, 4, (LR, HIDDEN), reserve=0.5) == [0, 1, 2, 3]
    assert hedged_top(trials[:3], 4, (LR, HIDDEN), reserve=0.5) == [0, 1, 2]


@pytest.mark.parametrize("reserve", [0.0, 0.5, 1.0])
def test_promotion_never_picks_a_trial_twice(reserve):
    trials = [({"solver.lr": 10 ** (-4 + 3 * i / 9), "model.hidden": [[64], [128]][i % 2]}, i / 10) for i in range(10)]
    chosen = hedged_top(trials, 5, (LR, HIDDEN), reserve)
    assert len(chosen) == len(set(chosen)) == 5
