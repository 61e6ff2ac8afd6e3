"""A plan sized from a budget: parsing, the pure sizing with exact numbers, re-sizing, the record, the CLI."""
import dataclasses

import pytest

from master.budget import (Budget, BudgetError, Costs, fit_costs, parse_budget, plan_cost, plan_lines, planned_config,
                           resize, scale, size_plan)
from master.config import DEFAULT_STAGES, StageConfig, parse_config
from master.launcher import Reporter
from master.pruning import Rule
from worker.records import ExperimentRecord

from test_stages_cli import run, write_config  # noqa: F401  (the CLI runner fixture and a 3-stage config)


CLASSIC = (  # the default plan until session 5: its sizes are easy to follow by hand
    StageConfig("coarse", epochs=1, trials=32),
    StageConfig("medium", epochs=5, trials=16, method="narrow"),
    StageConfig("fine", epochs=30, trials=4, method="promote"),
)


def shape(stages):
    return [(s.name, s.method, s.trials, s.epochs) for s in stages]


@pytest.mark.parametrize("text, amount, unit", [
    ("20m", 1200.0, "s"), ("90s", 90.0, "s"), ("1.5h", 5400.0, "s"), ("2000ep", 2000.0, "ep"), (" 2m ", 120.0, "s"),
])
def test_budgets_parse(text, amount, unit):
    assert parse_budget(text) == Budget(amount, unit, text.strip())


@pytest.mark.parametrize("text", ["3x", "0s", "-1m", "m", "20 m", "2000", "1e3ep"])
def test_a_bad_budget_names_itself(text):
    with pytest.raises(BudgetError, match="--budget"):
        parse_budget(text)


def test_the_classic_plan_costs_212_epochs_and_a_budget_of_212_epochs_gives_it_back():
    assert plan_cost(CLASSIC) == 32 * 1 + 16 * 5 + 4 * (30 - 5)
    assert size_plan(CLASSIC, 212) == CLASSIC


def test_the_default_plan_costs_242_epochs_at_most_and_scales_every_rung():
    assert plan_cost(DEFAULT_STAGES) == 32 * 1 + 14 * (2 - 1) + 12 * (10 - 2) + 5 * (30 - 10) == 242
    assert size_plan(DEFAULT_STAGES, 242) == DEFAULT_STAGES
    sized = size_plan(DEFAULT_STAGES, 2000)  # 266 coarse trials would cost 2022
    assert shape(sized) == [("coarse", "random", 265, 1), ("short", "promote", 116, 2), ("medium", "promote", 99, 10),
                            ("fine", "promote", 41, 30)]
    assert [s.quantile for s in sized] == [None, 0.5, 0.8, 0.5]  # the shares stay, the caps scale
    assert plan_cost(sized) == 265 + 116 + 99 * 8 + 41 * 20 == 1993


def test_a_promote_stage_pooling_every_screen_may_take_more_than_the_stage_before_it():
    plan = (StageConfig("coarse", epochs=1, trials=32), StageConfig("medium", epochs=3, trials=8, method="promote"),
            StageConfig("second", epochs=3, trials=6, method="narrow"),
            StageConfig("third", epochs=8, trials=8, method="promote", pool="all", quantile=0.5),
            StageConfig("fine", epochs=30, trials=4, method="promote", quantile=0.5))
    # third pools medium's 8 and second's 6 at 3 epochs: 8 stays 8 (not capped at second's 6)
    assert [s.trials for s in scale(plan, 32)] == [32, 8, 6, 8, 4]
    # at 16 coarse trials, 4 + 3 pooled >= 4; with `available` 1 after second, third takes at most 1 + medium's 8
    assert [s.trials for s in scale(plan, 16)] == [16, 4, 3, 4, 2]
    assert [s.trials for s in scale(plan, 64, done=3, available=1)][3] == 1 + 8


def test_an_epoch_budget_scales_every_stage_in_proportion():
    sized = size_plan(CLASSIC, 2000)
    assert shape(sized) == [("coarse", "random", 300, 1), ("medium", "narrow", 150, 5), ("fine", "promote", 38, 30)]
    assert sized[2].top == 38 and plan_cost(sized) == 300 + 750 + 38 * 25 == 2000
    assert plan_cost(size_plan(CLASSIC, 1999)) <= 1999


def test_a_wall_time_budget_counts_epochs_trials_stages_and_workers():
    costs = Costs(epoch=0.5, trial=0.1, stage=2.0, workers=2)
    # n coarse trials cost 6 + 0.3 n + 1.3 round(n/2) + 6.3 round(n/8) s: 119.1 s at n = 66, 120.7 s at 67
    sized = size_plan(CLASSIC, 120, costs)
    assert shape(sized) == [("coarse", "random", 66, 1), ("medium", "narrow", 33, 5), ("fine", "promote", 8, 30)]
    assert plan_cost(sized, costs) == pytest.approx(119.1)


def test_a_stage_of_few_trials_costs_its_longest_trial():
    costs = Costs(epoch=1.0, trial=0.0, stage=0.0, workers=8)
    assert plan_cost((StageConfig("only", epochs=10, trials=2),), costs) == 10.0


def test_a_budget_below_one_trial_per_stage_gives_one_trial_with_the_epochs_that_fit():
    assert shape(size_plan(CLASSIC, 30)) == [("coarse", "random", 1, 30)]
    assert shape(size_plan(CLASSIC, 7)) == [("coarse", "random", 1, 7)]
    assert size_plan(CLASSIC, 7)[0].prune == "none"


@pytest.mark.parametrize("amount, costs", [(0.5, None), (2.0, Costs(epoch=0.5, trial=0.1, stage=2.0))])
def test_a_budget_too_small_for_one_epoch_of_one_trial_is_refused(amount, costs):
    with pytest.raises(BudgetError, match="too small for one epoch of one trial"):
        size_plan(CLASSIC, amount, costs)


def test_resizing_keeps_the_stages_run_and_fits_what_is_left():
    sized = resize(CLASSIC, 1, 300, None)
    assert sized[0] == CLASSIC[0]
    # medium m trials x 5 + fine round(m/4) x 25 <= 300: m = 30 costs 150 + 8 x 25 = 350, m = 26 costs 130 + 150
    assert shape(sized[1:]) == [("medium", "narrow", 26, 5), ("fine", "promote", 6, 30)]
    assert shape(resize(CLASSIC, 2, 300, None, available=5)[2:]) == [("fine", "promote", 5, 30)]
    assert shape(resize(CLASSIC, 2, 0, None)[2:]) == [("fine", "promote", 1, 30)]  # at least one trial
    assert resize(CLASSIC, 0, 10, None) == CLASSIC


def test_the_cost_model_is_refitted_to_the_trials_and_stages_that_ran():
    prior = Costs(epoch=0.1, trial=0.05, stage=4.0, workers=2)
    # trials of 1 and 5 epochs at 0.03 s + 0.02 s an epoch; stages of 10 s and 6 s walls with 8 s and 4 s of work
    trials = [(1, 0.05), (1, 0.05), (5, 0.13), (5, 0.13)]
    fitted = fit_costs(prior, trials, [(10.0, 8.0), (6.0, 4.0)])
    assert (fitted.epoch, fitted.trial, fitted.stage, fitted.workers) == pytest.approx((0.02, 0.03, 5.0, 2))
    same = fit_costs(prior, [(1, 0.3), (1, 0.3)], [])  # all one epoch: the prior's split, rescaled to 0.3 s
    assert (same.epoch, same.trial, same.stage) == pytest.approx((0.2, 0.1, 4.0))
    assert fit_costs(prior, [], []) == prior
    steep = fit_costs(prior, [(1, 0.1), (3, 0.5)], [(1.0, 4.0)])  # a line through -0.1 s at 0 epochs, a wall < work
    assert (steep.epoch, steep.trial, steep.stage) == pytest.approx((0.15, 0.0, 0.0))  # never a negative cost


def test_plan_lines_show_each_stage_and_the_total():
    lines = plan_lines(CLASSIC, parse_budget("212ep"), None, first=1)
    assert lines == ["  medium: 16 trials x 5 epochs (narrowed, prune asha), at most 80 epochs",
                     "  fine: 4 trials x 30 epochs (best continued from epoch 5, prune asha), at most 100 epochs",
                     "  at most 180 epochs in all"]


def test_plan_lines_show_a_share_and_its_cap():
    lines = plan_lines(DEFAULT_STAGES, parse_budget("242ep"), None, first=3)
    assert lines == ["  fine: at most 5 trials x 30 epochs (the best 50% of those completed continued from epoch 10, "
                     "prune none), at most 100 epochs", "  at most 100 epochs in all"]


def test_asha_rungs_never_come_before_the_screen():
    assert Rule(30, rung=1, eta=3).rungs() == [1, 3, 9, 27]
    assert Rule(30, rung=1, eta=3, screen=3).rungs() == [3, 9, 27]
    assert Rule(30, rung=1, eta=3, start=5, screen=2).rungs() == [6, 18]


def test_a_sized_plan_is_recorded_and_read_back():
    config = parse_config('[experiment]\nname = "x"\ndataset = "digits"\n')
    sized = size_plan(config.stages, 2000)
    entry = {"after": None, "stages": [{"name": s.name, **s.to_dict()} for s in sized]}
    record = ExperimentRecord("x", config.to_dict(), "", 0, "now", budget={"text": "2000ep"}, plans=(entry,))
    again = ExperimentRecord.from_dict(record.to_dict())
    assert again == record and planned_config(config, again).stages == sized
    plain = ExperimentRecord("x", config.to_dict(), "", 0, "now")
    assert "budget" not in plain.to_dict() and planned_config(config, plain) is config
    broken = dataclasses.replace(record, plans=({"stages": [{"name": "c", "epochs": 0, "trials": 1}]},))
    with pytest.raises(Exception, match="plan in experiment.json is unreadable"):
        planned_config(config, broken)


@pytest.mark.parametrize("args, culprit", [
    (["--all", "--budget", "3x"], "--budget '3x'"),
    (["--budget", "2m"], "use it with --all"),
    (["--all", "--budget", "0.5ep"], "--budget 0.5ep: too small for one epoch of one trial"),
    (["--all", "--budget", "1s"], "--budget 1s: too small for one epoch of one trial"),
])
def test_bad_budgets_are_refused_in_one_line_before_writing(run, tmp_path, args, culprit):  # noqa: F811
    (tmp_path / "s").mkdir()
    result = run("launch", "--config", write_config(tmp_path, "b"), "--storage", tmp_path / "s", *args)
    assert result.exit_code == 2 and culprit in result.output and len(result.output.strip().splitlines()) == 1
    assert list((tmp_path / "s").iterdir()) == []


def test_launch_all_with_an_epoch_budget_sizes_records_and_resumes_its_plan(run, tmp_path):  # noqa: F811
    from worker.store import ExperimentStore

    path = write_config(tmp_path, "budgeted", trials=4, medium=2)  # coarse 4 x 1, medium 2 x 2, fine 1 x 4
    (tmp_path / "s").mkdir()
    result = run("launch", "--config", path, "--storage", tmp_path / "s", "--all", "--budget", "24ep",
                 "--workers", 2)
    assert result.exit_code == 0, result.output
    # n + 2 round(n/2) + 2 round(n/4) epochs <= 24: n = 10 (24), n = 11 costs 29
    assert "coarse: 10 trials x 1 epochs" in result.output and "medium: 5 trials x 2 epochs" in result.output
    store = ExperimentStore(tmp_path / "s", "budgeted")
    record = store.read_experiment()
    assert record.budget["amount"] == 24 and record.budget["unit"] == "ep"
    assert [p["after"] for p in record.plans] == [None, "coarse", "medium"]
    assert len(record.id) == 16  # its jobs carry the id, as an unbudgeted launch's do
    counts = [len(store.read_stage(s).trial_ids) for s in ("coarse", "medium", "fine")]
    assert counts[:2] == [10, 5] and 1 <= counts[2] <= 2
    spent = sum(store.read_result(t).epochs_done for s in ("coarse", "medium") for t in store.read_stage(s).trial_ids)
    spent += sum(store.read_result(t).epochs_done - 2 for t in store.read_stage("fine").trial_ids)
    assert spent <= 24
    again = run("launch", "--config", path, "--storage", tmp_path / "s", "--all")
    assert again.exit_code == 0 and again.stdout.count("already completed") == 3


def test_at_the_deadline_the_stage_stops_its_trials_with_the_reason(tmp_path, monkeypatch):
    from dataclasses import replace

    from master.launcher import BUDGET_REASON, launch_stage, prepare
    from test_stages_cli import LONG
    from worker.store import ExperimentStore

    monkeypatch.delenv("REDIS_URL", raising=False)
    path = tmp_path / "long.toml"
    path.write_text(LONG.format(name="deadline", epochs=200, trials=3))  # each trial would take minutes
    (tmp_path / "s").mkdir()
    setup = replace(prepare(path, storage=tmp_path / "s", workers=1), deadline=0.0)  # already past
    assert launch_stage(setup, "coarse", None, None, None, True, Reporter()) == 0
    store = ExperimentStore(tmp_path / "s", "deadline")
    results = [store.read_result(f"coarse-000{i}") for i in range(3)]
    assert [(r.state, r.reason) for r in results] == [("KILLED", BUDGET_REASON)] * 3
    assert all(r.epochs_done < 200 for r in results) and store.read_stage("coarse").status == "completed"
