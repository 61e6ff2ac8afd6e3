"""benchmarks/replay.py on a tiny recorded table: nearest neighbours, the product's plan driven on curves."""
import sys
from pathlib import Path

import pytest

from master.config import parse_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import replay as bench  # noqa: E402

FAST = [0.8, 0.82, 0.83, 0.84]  # a high learning rate: best after one epoch, flat after
MIDDLE = [0.7, 0.71, 0.72, 0.73]  # a middle one: a good start, flat after
SLOW = [0.3, 0.6, 0.8, 0.95]  # a low one: last after one epoch, best at the end
TABLE = {"configs": [{"params": {"solver.lr": lr}, "state": "COMPLETED", "curve": curve}
                     for lr, curve in ((1e-1, FAST), (1e-3, MIDDLE), (1e-5, SLOW))]}
# nearest neighbours change at 1e-4 and 1e-2, the borders of the thirds of the log scale that hedging bins by
CONFIG = """
[experiment]
name = "tiny-{hedge}"
dataset = "digits"
[stages.coarse]
epochs = 1
trials = 6
prune = "none"
[stages.fine]
epochs = 4
trials = 3
method = "promote"
prune = "none"
hedge = {hedge}
[space.solver]
lr = {{ dist = "loguniform", low = 1e-6, high = 1.0 }}
"""


def config(hedge=0.0):
    return parse_config(CONFIG.format(hedge=hedge))


def test_a_sampled_configuration_trains_as_its_nearest_recorded_one_in_the_unit_scale():
    table = bench.Table(TABLE, config())
    assert table.nearest({"solver.lr": 0.3})["curve"] == FAST
    assert table.nearest({"solver.lr": 3e-6})["curve"] == SLOW
    assert table.nearest({"solver.lr": 3e-4})["curve"] == MIDDLE  # 1e-3 is nearer than 1e-5 on the log scale


@pytest.mark.parametrize("hedge, promoted", [(0.0, ["FAST", "MIDDLE", "MIDDLE"]), (0.5, ["FAST", "MIDDLE", "SLOW"])])
def test_the_products_plan_runs_on_the_curves_and_promotions_continue_them(tmp_path, hedge, promoted):
    cfg = config(hedge)
    table = bench.Table(TABLE, cfg)
    trials = bench.simulate(cfg, table, tmp_path)
    coarse, fine = trials[:6], trials[6:]
    assert len(fine) == 3 and all(len(f) == 3 for f in fine)  # promoted from epoch 1 to 4: three more epochs each
    assert sum(map(len, trials)) == 6 + 3 * 3
    continued = [{tuple(FAST[1:]): "FAST", tuple(SLOW[1:]): "SLOW", tuple(MIDDLE[1:]): "MIDDLE"}[tuple(f)]
                 for f in fine]
    # seed 0 samples one trial near 1e-1, two near 1e-3, three near 1e-5; with a hedge, two of the three
    # promotions go to the best of each learning-rate bin the leader misses
    assert sorted(c[0] for c in coarse) == [0.3, 0.3, 0.3, 0.7, 0.7, 0.8]
    assert continued == promoted


def test_summary_counts_runs_within_half_a_point_and_at_five_times():
    rows = [("t", "p", 0, 0.90, 0.897, 960, 100, 300.0, 50), ("t", "p", 1, 0.90, 0.80, 960, 300, 300.0, float("inf"))]
    assert bench.summary(rows)[2] == "| t | p | 2 | 1 | 0.21, 0.31 | 1 | -5.15 |"


def test_fit_at_reads_the_least_squares_line():
    assert bench.fit_at([[1, 0.2], [2, 0.4], [3, 0.6]], 4) == pytest.approx(0.8)
    assert bench.fit_at([[0, 0.0], [1, 1.0], [2, 0.5]], 1) == pytest.approx(0.5)  # slope 0.25, intercept 0.25
