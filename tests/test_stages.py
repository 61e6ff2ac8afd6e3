"""Tests for stages from storage alone: narrowing a synthetic leaderboard, border flags, promotion, completion."""
import math
import re

import numpy as np
import pytest

from master.config import ConfigError, parse_config
from master.stages import border_flags, evidence, plan_stage, previous_stage, ranked, stage_space, stage_status
from conftest import NullControl, record_result, record_stage
from worker.spec import TrialSpec
from worker.store import ExperimentStore, load_npz
from worker.trainer import run_trial

CONFIG = """
[experiment]
name = "stages"
dataset = "digits"

[model]
hidden = [16]

[solver]
update = "adam"
batch_size = 64

[stages.coarse]
epochs = 1
trials = 10

[stages.medium]
epochs = 2
trials = 6
method = "narrow"
quantile = 0.4

[stages.fine]
epochs = 4
trials = 2
method = "promote"

[space.solver]
lr = { dist = "loguniform", low = 1e-6, high = 1e-1 }

[space.model]
dropout = { dist = "uniform", low = 0.0, high = 0.5 }
hidden = { dist = "choice", values = [[32], [64]] }
"""
UNITS = [0.05 + 0.1 * i for i in range(10)]  # lr positions of the ten coarse trials
DROPOUTS = [0.35, 0.1, 0.2, 0.3, 0.05, 0.4, 0.15, 0.45, 0.25, 0.5]


@pytest.fixture
def config():
    return parse_config(CONFIG)


@pytest.fixture
def store(tmp_path):
    return ExperimentStore(tmp_path, "stages").ensure()


def lr_at(u):
    return 10 ** (-6 + 5 * u)


def write_trials(store, config, stage, accs, params_of, state="COMPLETED"):
    """Synthetic trials: spec.json and result.json only (no training)."""
    for i, acc in enumerate(accs):
        spec = config.trial_spec(stage, i, 100 + i, params_of(i))
        store.write_spec(spec.to_dict())
        record_result(store, spec.trial_id, {"state": state, "reason": "", "best_val_acc": acc,
                                           "epochs_done": config.stage(stage).epochs})


def coarse_params(i):
    hidden = [64] if i in (4, 5, 6, 7) else [32]
    return {"solver.lr": lr_at(UNITS[i]), "model.dropout": DROPOUTS[i], "model.hidden": hidden}


def test_narrow_derives_the_expected_ranges_from_a_synthetic_leaderboard(store, config):
    # accuracy peaks at lr position 0.62: the top 40% are positions 0.65, 0.55, 0.75, 0.45 (span 0.3)
    write_trials(store, config, "coarse", [1 - abs(u - 0.62) for u in UNITS], coarse_params)
    assert [r.trial_id for r in ranked(store, "coarse")][:4] == ["coarse-0006", "coarse-0005", "coarse-0007",
                                                                 "coarse-0004"]
    plan = plan_stage(store, config, "medium")
    lr, dropout, hidden = plan.space
    assert (lr.low, lr.high) == (pytest.approx(lr_at(0.35)), pytest.approx(lr_at(0.85)))  # span padded by 0.1
    assert (dropout.low, dropout.high) == (0.0, 0.5)  # top dropouts spread like chance: weak evidence, kept
    assert hidden.values == ([64],)  # [32] missing from all 4 top trials: (1/2)^4 < 0.1
    assert [old.name for old, new in plan.ranges if old != new] == ["solver.lr", "model.hidden"]
    assert plan.flags == ()
    assert [s.trial_id for s in plan.specs] == [f"medium-{i:04d}" for i in range(6)]
    for spec in plan.specs:
        assert lr.low <= spec.params["solver.lr"] <= lr.high and spec.params["model.hidden"] == [64]
        assert spec.epochs == 2 and spec.parent is None
    assert plan_stage(store, config, "medium").specs == plan.specs  # deterministic: launching again is idempotent
    record_stage(store, "medium", [s.trial_id for s in plan.specs], ranges={d.name: d.to_dict() for d in plan.space})
    record_result(store, "coarse-0000", {"state": "COMPLETED", "best_val_acc": 1.0})  # the previous stage changed
    again = plan_stage(store, config, "medium")
    assert again.specs == plan.specs and again.note.startswith("resuming stage medium")  # recorded ranges win


def test_flags_at_the_upper_border_widen_that_side(store, config):
    write_trials(store, config, "coarse", UNITS, coarse_params)  # accuracy rises with lr: the optimum is above
    flags = border_flags(store, config, "coarse")
    assert [(f.name, f.side) for f in flags] == [("solver.lr", "upper")]
    assert flags[0].best == pytest.approx(lr_at(0.95))
    plan = plan_stage(store, config, "medium")
    assert plan.flags == tuple(flags)
    assert plan.space[0].high == pytest.approx(1.0) and plan.space[0].low == pytest.approx(lr_at(0.55))


def test_flags_at_the_lower_border_and_a_narrowed_stage_is_judged_in_its_own_ranges(store, config):
    write_trials(store, config, "coarse", [1 - u for u in UNITS], coarse_params)
    assert [(f.name, f.side) for f in border_flags(store, config, "coarse")] == [("solver.lr", "lower")]
    record_stage(store, "medium", [], ranges={"solver.lr": {"dist": "loguniform", "low": 1e-3, "high": 1e-2}})
    assert stage_space(store, config, "medium")[0].low == 1e-3
    assert stage_space(store, config, "medium")[1] == config.space[1]


def test_promote_continues_the_best_completed_trials(store, config):
    write_trials(store, config, "medium", [0.7, 0.9, 0.8], lambda i: {"solver.lr": 1e-3 * (i + 1)})
    killed = config.trial_spec("medium", 3, 7, {"solver.lr": 0.05})
    store.write_spec(killed.to_dict())
    record_result(store, killed.trial_id, {"state": "KILLED", "best_val_acc": 0.99, "epochs_done": 1})
    plan = plan_stage(store, config, "fine")
    assert [(s.trial_id, s.parent, s.seed, s.epochs) for s in plan.specs] == [
        ("fine-0000", "medium-0001", 101, 4), ("fine-0001", "medium-0002", 102, 4)]
    assert plan.specs[0].params == {"solver.lr": 2e-3}
    assert "from epoch 2 to 4" in plan.note
    for spec in plan.specs:
        store.write_spec(spec.to_dict())
    record_stage(store, "fine", [s.trial_id for s in plan.specs])
    record_result(store, "medium-0000", {"state": "COMPLETED", "best_val_acc": 1.0})
    assert plan_stage(store, config, "fine").specs == plan.specs  # resumed as launched, not re-ranked


@pytest.mark.parametrize("quantile, diverged, promoted", [(0.5, 0, 2), (0.5, 2, 2), (0.5, 6, 1), (0.1, 0, 1)])
def test_promote_with_a_quantile_continues_that_share_of_the_completed_trials(tmp_path, quantile, diverged,
                                                                                promoted):
    # 8 medium trials, `diverged` of them DIVERGED: the best ceil(quantile x completed) continue, at most trials
    config = parse_config(CONFIG.replace('trials = 2\nmethod = "promote"\n',
                                         f'trials = 2\nmethod = "promote"\nquantile = {quantile}\n'))
    assert config.stage("fine").quantile == quantile and config.stage("fine").top == 2
    store = ExperimentStore(tmp_path, "stages").ensure()
    accs = [0.1 * (i + 1) for i in range(8)]
    write_trials(store, config, "medium", accs[:8 - diverged], lambda i: {"solver.lr": 1e-3 * (i + 1)})
    for i in range(8 - diverged, 8):
        spec = config.trial_spec("medium", i, 100 + i, {"solver.lr": 1e-3 * (i + 1)})
        store.write_spec(spec.to_dict())
        record_result(store, spec.trial_id, {"state": "DIVERGED", "best_val_acc": accs[i], "epochs_done": 1})
    plan = plan_stage(store, config, "fine")
    best = 7 - diverged
    assert [s.parent for s in plan.specs] == [f"medium-{i:04d}" for i in range(best, best - promoted, -1)]
    assert f"the best {promoted} of {8 - diverged} completed trials of stage medium (the best " in plan.note


def test_promote_ranks_by_the_epoch_it_continues_from_not_the_best_one(store, config):
    # medium-0000 peaked at 0.9 and fell back to 0.6; medium-0001 ends at 0.8: the one that continues is ranked
    write_trials(store, config, "medium", [0.9, 0.8, 0.7], lambda i: {"solver.lr": 1e-3 * (i + 1)})
    for tid, curve in (("medium-0000", [0.9, 0.6]), ("medium-0001", [0.5, 0.8])):  # medium-0002: no history
        store.write_history(tid, [{"epoch": e, "val_acc": a} for e, a in enumerate(curve, 1)])
    plan = plan_stage(store, config, "fine")
    assert [s.parent for s in plan.specs] == ["medium-0001", "medium-0002"]  # 0.8, then 0.7 (its best, no history)


POINTED = CONFIG.replace('method = "narrow"\nquantile = 0.4\n', 'method = "narrow"\nquantile = 0.4\nval_points = 4\n')


def test_a_stages_val_points_go_into_its_trials_solver():
    config = parse_config(POINTED)
    assert config.trial_spec("medium", 0, 1, {}).solver["val_points"] == 4  # the stage's
    assert config.trial_spec("fine", 0, 1, {}).solver["val_points"] == 1  # the solver's default elsewhere
    solver = parse_config(POINTED.replace("[solver]\n", "[solver]\nval_points = 8\n"))
    assert [solver.trial_spec(s, 0, 1, {}).solver["val_points"] for s in ("coarse", "medium")] == [8, 4]


@pytest.mark.parametrize("value, message", [
    ("0", "stages.medium.val_points: expected an integer >= 1, got 0"),
    ("101", "stages.medium.val_points: expected an integer from 1 to 100, got 101"),
    ("2.5", "stages.medium.val_points: expected an integer >= 1, got 2.5"),
])
def test_a_stages_val_points_are_checked(value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(POINTED.replace("val_points = 4\n", f"val_points = {value}\n"))


def test_a_stage_needs_finished_trials_before_it(store, config):
    with pytest.raises(ConfigError, match="^stage medium: stage coarse has no finished trial to narrow from"):
        plan_stage(store, config, "medium")
    assert previous_stage(config, "coarse") is None and previous_stage(config, "fine").name == "medium"


LATE = CONFIG.replace("""[stages.medium]
epochs = 2
trials = 6
method = "narrow"
quantile = 0.4

[stages.fine]
epochs = 4
trials = 2
method = "promote"
""", """[stages.medium]
epochs = 3
trials = 3
method = "promote"

[stages.fine]
epochs = 5
trials = 4
method = "narrow"
top = 3
""")


def test_narrow_after_a_promotion_ranks_the_whole_screen_at_the_longest_horizon(tmp_path):
    config = parse_config(LATE)
    store = ExperimentStore(tmp_path, "stages").ensure()
    write_trials(store, config, "coarse", UNITS, coarse_params)  # one epoch: the fastest learners (high lr) lead
    longer = {9: 0.3, 8: 0.8, 7: 0.9}  # after 3 epochs the fastest has stalled; positions 0.85 and 0.75 lead
    for i, (parent, acc) in enumerate(longer.items()):
        spec = config.trial_spec("medium", i, 100 + parent, coarse_params(parent), parent=f"coarse-{parent:04d}")
        store.write_spec(spec.to_dict())
        record_result(store, spec.trial_id, {"state": "COMPLETED", "best_val_acc": acc, "epochs_done": 3})
    assert [(r.trial_id, r.val_acc) for r in evidence(store, config, "medium")][:5] == [
        ("medium-0002", 0.9), ("medium-0001", 0.8), ("coarse-0006", UNITS[6]), ("coarse-0005", UNITS[5]),
        ("coarse-0004", UNITS[4])]
    assert len(evidence(store, config, "medium")) == 10  # every configuration once: the promoted at 3 epochs
    assert evidence(store, config, "coarse") == ranked(store, "coarse")
    plan = plan_stage(store, config, "fine")
    lr, dropout, hidden = plan.space
    assert (lr.low, lr.high) == (pytest.approx(lr_at(0.55)), pytest.approx(lr_at(0.95)))  # 0.65-0.85, padded
    assert (dropout.low, dropout.high) == (0.0, 0.5) and hidden == config.space[2]
    assert plan.note.startswith("ranges from the best 3 of 10 finished trials of stage medium and the trials it "
                                "did not promote")
    assert [(f.name, f.side) for f in border_flags(store, config, "medium")] == []


def test_a_promote_stage_with_pool_all_ranks_every_earlier_trial_at_the_previous_horizon(tmp_path):
    config = parse_config(LATE.replace('top = 3\n', 'top = 3\n[stages.final]\nepochs = 9\ntrials = 3\n'
                                       'method = "promote"\npool = "all"\n').replace('[stages.medium]\nepochs = 3',
                                                                                     '[stages.medium]\nepochs = 5'))
    store = ExperimentStore(tmp_path, "stages").ensure()
    write_trials(store, config, "coarse", UNITS, coarse_params)  # 1 epoch: never at the fine stage's 5
    for i, (parent, acc) in enumerate({9: 0.3, 8: 0.8, 7: 0.9}.items()):  # 5 epochs
        spec = config.trial_spec("medium", i, 100 + parent, coarse_params(parent), parent=f"coarse-{parent:04d}")
        store.write_spec(spec.to_dict())
        record_result(store, spec.trial_id, {"state": "COMPLETED", "best_val_acc": acc, "epochs_done": 5})
    write_trials(store, config, "fine", [0.85, 0.95, 0.5, 0.7], lambda i: coarse_params(i))
    record_result(store, "fine-0001", {"state": "KILLED", "best_val_acc": 0.95, "epochs_done": 3})  # stopped early
    plan = plan_stage(store, config, "final")
    assert [(s.trial_id, s.parent, s.epochs) for s in plan.specs] == [
        ("final-0000", "medium-0002", 9), ("final-0001", "fine-0000", 9), ("final-0002", "medium-0001", 9)]
    assert plan.note.startswith("the best 3 of 6 completed trials of every earlier stage continue from epoch 5 to 9")
    assert [s.parent for s in plan_stage(store, parse_config(LATE + '[stages.final]\nepochs = 9\ntrials = 3\n'
                                                              'method = "promote"\n'), "final").specs] == [
        "fine-0000", "fine-0003", "fine-0002"]  # pool "previous": the fine stage's only


def test_pool_is_for_promote_stages_only():
    with pytest.raises(ConfigError, match=r"^stages.medium.pool: only promote stages use it"):
        parse_config(CONFIG.replace('quantile = 0.4\n', 'quantile = 0.4\npool = "all"\n'))
    with pytest.raises(ConfigError, match=r"^stages.fine.pool: expected one of previous, all, got 'some'"):
        parse_config(CONFIG.replace('method = "promote"\n', 'method = "promote"\npool = "some"\n'))


def test_promote_resumes_epochs_exactly(tmp_path):
    config = parse_config(CONFIG.replace('lr = { dist = "loguniform", low = 1e-6, high = 1e-1 }',
                                         'lr = { dist = "loguniform", low = 1e-3, high = 3e-3 }'))
    store = ExperimentStore(tmp_path, "stages").ensure()
    parent = config.trial_spec("medium", 0, 5, {"solver.lr": 2e-3, "model.dropout": 0.1, "model.hidden": [32]})
    run_trial(parent, store, NullControl())
    (child,) = plan_stage(store, config, "fine", trials=1).specs
    result = run_trial(child, store, NullControl())
    history = store.read_history(child.trial_id)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]  # no epoch repeated, none missing
    assert history[:2] == store.read_history(parent.trial_id)  # the parent's epochs, not retrained
    assert result.epochs_done == 4 and result.state == "COMPLETED"
    straight = TrialSpec.from_dict({**child.to_dict(), "trial_id": "straight", "parent": None})
    run_trial(straight, store, NullControl())
    again = store.read_history("straight")
    for a, b in zip(history, again):
        assert a["val_acc"] == b["val_acc"] and math.isclose(a["train_loss"], b["train_loss"], rel_tol=1e-6)
    final = load_npz(store.latest_checkpoint(child.trial_id).path)
    reference = load_npz(store.latest_checkpoint("straight").path)
    np.testing.assert_allclose(final["param.W1"], reference["param.W1"], rtol=1e-6)


def test_stage_status_counts_unfinished_and_retryable(store, config):
    write_trials(store, config, "coarse", [0.5, 0.6], coarse_params)
    record_result(store, "coarse-0001", {"state": "FAILED", "reason": "DataError"})
    spec = config.trial_spec("coarse", 2, 0, coarse_params(2))
    store.write_spec(spec.to_dict())
    ids = ["coarse-0000", "coarse-0001", "coarse-0002"]
    status = stage_status(store, ids, max_retries=1)
    assert status.unfinished == ("coarse-0002",) and status.retryable == ("coarse-0001",)
    assert not status.finished and status.counts == {"COMPLETED": 1, "FAILED": 1, "unfinished": 1}
    store.append_event("coarse-0001", {"event": "retry"})
    record_result(store, "coarse-0002", {"state": "KILLED"})
    status = stage_status(store, ids, max_retries=1)
    assert status.finished and status.describe() == "1 COMPLETED, 1 FAILED, 1 KILLED"
