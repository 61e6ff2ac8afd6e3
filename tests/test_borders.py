"""Tests for border flags and range narrowing: closed-form chance, sides, widening, weak evidence, choices."""
import math

import pytest

from master.borders import (ALPHA, BorderFlag, analyse, border_side, chance_of_spread, core, derive_range,
                            narrow_choice, range_text, top_trials, weak_evidence)
from master.config import Distribution

LR = Distribution("solver.lr", "loguniform", 1e-6, 1e-1)
DROPOUT = Distribution("model.dropout", "uniform", 0.0, 0.5)
BATCH = Distribution("solver.batch_size", "int", 16, 256)
HIDDEN = Distribution("model.hidden", "choice", values=([64], [128], [256, 128]))


def always(value):
    return True


def lr_at(u):
    return 10 ** (-6 + 5 * u)


POOL = [(i + 0.5) / 32 for i in range(32)]  # positions of a stage's 32 trials, evenly spread


def test_chance_of_spread_is_a_permutation_test_of_the_interquartile_range():
    assert chance_of_spread(POOL, POOL) == 1.0  # the top group is everyone: no evidence
    assert chance_of_spread(POOL[:8], POOL) == pytest.approx(1 / 2001)  # the 8 lowest: no subset tighter
    assert chance_of_spread([0.1, 0.5, 0.9], POOL) > 0.5  # spread like random picks
    assert chance_of_spread([0.4, 0.44, 0.5, 0.54, 0.6], POOL) == chance_of_spread([0.4, 0.44, 0.5, 0.54, 0.6], POOL)


def test_weak_evidence():
    assert weak_evidence([0.5, 0.51], POOL)  # too few trials to say anything
    assert not weak_evidence([0.40, 0.42, 0.45, 0.5, 0.55, 0.6], POOL)
    assert weak_evidence([0.05, 0.5, 0.95], POOL)


def test_core_drops_outliers_but_never_the_best():
    assert core([0.9, 0.85, 0.8, 0.82, 0.88, 0.1]) == [0.9, 0.85, 0.8, 0.82, 0.88]
    assert core([0.1, 0.85, 0.8, 0.82, 0.88, 0.9]) == [0.1, 0.85, 0.8, 0.82, 0.88, 0.9]


def test_top_trials_by_count_and_quantile():
    scored = [({"i": i}, i / 10) for i in range(10)]
    assert [p["i"] for p, _ in top_trials(scored, top=3)] == [9, 8, 7]
    assert [p["i"] for p, _ in top_trials(scored, quantile=0.25)] == [9, 8, 7]  # ceil(2.5)
    assert len(top_trials(scored[:2], quantile=0.2)) == 1


def test_border_side_needs_the_best_at_the_edge_and_most_top_trials_on_that_half():
    assert border_side([0.95, 0.7, 0.6]) == "upper"
    assert border_side([0.05, 0.3, 0.2, 0.9]) == "lower"
    assert border_side([0.5, 0.95]) is None  # the best is inside
    assert border_side([0.95, 0.2, 0.3]) is None  # most of the top is on the other half
    assert border_side([0.91]) == "upper"
    assert border_side([]) is None


def test_issue_example_message():
    flag = BorderFlag(LR.name, "upper", 0.087, 1e-6, 1e-1, 1e-4, 1.0)
    assert flag.widened
    assert flag.message(LR) == ("solver.lr: best 8.7e-02 at the upper border of [1e-06, 1e-01] "
                                "-> widen to [1e-04, 1e+00]")


def test_upper_border_widens_that_side_and_narrows_the_other():
    units = [0.97, 0.95, 0.93, 0.9, 0.6]  # 0.6 is an outlier of this top group: the core is 0.9..0.97
    low, high = derive_range(LR, units, POOL, 0.1, "upper", always)
    assert (low, high) == (pytest.approx(lr_at(0.8)), pytest.approx(1.0))  # 0.9 - 0.1 ... 1 + 0.2


def test_narrowing_pads_and_clips_to_the_old_range():
    low, high = derive_range(DROPOUT, [0.4, 0.44, 0.5, 0.54, 0.6, 0.42], POOL, 0.1, None, always)
    assert (low, high) == (pytest.approx(0.15), pytest.approx(0.35))  # units 0.4-0.1, 0.6+0.1 of [0, 0.5]
    low, high = derive_range(LR, [0.97, 0.95, 0.93, 0.9], POOL, 0.1, None, always)
    assert high == 1e-1 and low == pytest.approx(lr_at(0.8))


def test_weak_evidence_keeps_the_old_range_exactly():
    assert derive_range(LR, [0.1, 0.5, 0.9], POOL, 0.1, None, always) == (1e-6, 1e-1)
    assert derive_range(LR, [0.95, 0.5, 0.9], POOL, 0.1, "upper", always) == (1e-6, pytest.approx(1.0))


def test_lower_border_that_cannot_widen_keeps_its_bound():
    units = [0.0, 0.02, 0.04, 0.06]
    low, high = derive_range(DROPOUT, units, POOL, 0.1, "lower", lambda v: v >= 0)
    assert low == 0.0 and high == pytest.approx(0.08)
    flag = BorderFlag(DROPOUT.name, "lower", 0.0, 0.0, 0.5, low, high)
    assert not flag.widened
    assert flag.message(DROPOUT) == ("model.dropout: best 0 at the lower border of [0, 0.5] -> cannot widen past "
                                     "the valid values; keep [0, 0.08]")


def test_int_ranges_stay_ints_and_never_collapse():
    low, high = derive_range(BATCH, [0.5, 0.5, 0.5, 0.5], POOL, 0.0, None, always)
    assert (low, high) == (136, 137)
    assert isinstance(low, int) and isinstance(high, int)


def test_narrow_choice_drops_only_what_chance_rarely_leaves_out():
    everyone = [[64]] * 3 + [[128]] * 3 + [[256, 128]] * 4  # ten trials
    top = [[64], [128], [64], [128]]
    # [256, 128] is missing from the top 4: C(6, 4) / C(10, 4) = 15 / 210 = 0.071 < 0.1
    assert narrow_choice(HIDDEN, top, everyone).values == ([64], [128])
    # with 2 of the 10 holding it: C(8, 4) / C(10, 4) = 70 / 210 = 0.33: could be chance
    assert narrow_choice(HIDDEN, top, [[64]] * 4 + [[128]] * 4 + [[256, 128]] * 2) == HIDDEN
    assert narrow_choice(HIDDEN, top[:2], everyone) == HIDDEN  # too few top trials
    assert narrow_choice(HIDDEN, top, top) == HIDDEN  # the top group is everyone
    assert ALPHA == 0.1


def test_analyse_flags_both_borders_and_builds_the_new_space():
    top = [({"solver.lr": lr_at(u), "model.dropout": d, "model.hidden": [64]}, 0.9 - i / 100)
           for i, (u, d) in enumerate([(0.99, 0.01), (0.95, 0.02), (0.9, 0.03), (0.85, 0.04), (0.8, 0.05)])]
    rest = [({"solver.lr": lr_at(u), "model.dropout": u / 2, "model.hidden": [128]}, 0.5) for u in POOL]
    space, flags = analyse(top, top + rest, (LR, DROPOUT, HIDDEN), 0.1,
                           lambda name, v: not (name == "model.dropout" and v < 0))
    assert {(f.name, f.side) for f in flags} == {("solver.lr", "upper"), ("model.dropout", "lower")}
    lr, dropout, hidden = space
    assert (lr.low, lr.high) == (pytest.approx(lr_at(0.7)), pytest.approx(1.0))
    assert (dropout.low, dropout.high) == (0.0, pytest.approx(0.5 * 0.2))
    assert hidden.values == ([64], [256, 128])  # [128]: 32 of 37 trials, none on top; [256, 128] never tried


def test_flag_round_trips_to_dict():
    flag = BorderFlag("solver.lr", "upper", 0.087, 1e-6, 0.1, 1e-4, 1.0)
    assert BorderFlag(**flag.to_dict()) == flag
    assert math.isclose(flag.to_dict()["best"], 0.087)


def test_range_text():
    assert range_text(LR) == "[1e-06, 1e-01]"
    assert range_text(Distribution("solver.lr", "loguniform", 1.8e-3, 5.6e-2)) == "[1.8e-03, 5.6e-02]"
    assert range_text(DROPOUT) == "[0, 0.5]" and range_text(BATCH) == "[16, 256]"
    assert range_text(HIDDEN) == "[64] | [128] | [256, 128]"
