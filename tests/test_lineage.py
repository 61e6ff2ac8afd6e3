"""Run lineage: a trial promoted through coarse -> medium -> fine is one run with one continuous history,
one leaderboard row, and ensembles pick distinct runs."""
import pytest

from conftest import NullControl, record_experiment
from master.ensemble import build_ensemble
from master.leaderboard import build_leaderboard, collapse_runs
from master.report import build_report
from master.lineage import chains, label, run_history
from worker.spec import TrialSpec
from worker.store import ExperimentStore
from worker.trainer import run_trial

DATA = {"seed": 3, "val_fraction": 0.2, "test_fraction": 0.2, "preprocess": "standardize"}


def _train(store, tid, epochs, lr=0.05, seed=1, parent=None):
    stage = tid.rsplit("-", 1)[0]
    spec = TrialSpec(experiment=store.experiment, trial_id=tid, stage=stage, dataset="spiral",
                     model={"hidden": [16]}, solver={"update": "adam", "lr": lr, "batch_size": 32},
                     epochs=epochs, seed=seed, params={"solver.lr": lr}, data=DATA, keep=2, parent=parent)
    return run_trial(spec, store, NullControl())


@pytest.fixture()
def store(tmp_path):
    s = ExperimentStore(tmp_path, "exp").ensure()
    record_experiment(s)
    return s


def test_a_run_promoted_through_three_stages_is_one_run_with_one_history(store):
    _train(store, "coarse-0000", 2)
    _train(store, "coarse-0001", 2, lr=0.01, seed=2)
    _train(store, "medium-0000", 4, parent="coarse-0000")
    _train(store, "fine-0000", 6, parent="medium-0000")
    runs = chains(dict(store.iter_trials()))
    assert runs == {"fine-0000": ("coarse-0000", "medium-0000", "fine-0000"), "coarse-0001": ("coarse-0001",)}
    assert label(runs["fine-0000"]) == "fine-0000 <- medium-0000 <- coarse-0000"
    history = run_history(store, runs["fine-0000"])
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5, 6]
    assert history[:2] == store.read_history("coarse-0000")  # the coarse epochs, trained once
    df = build_leaderboard(store)
    board = collapse_runs(store, df)
    assert sorted(board["trial"]) == ["coarse-0001", "fine-0000"]  # one row per run
    row = board.set_index("trial").loc["fine-0000"]
    assert row["stages"] == "coarse>medium>fine" and row["lineage"] == "fine-0000 <- medium-0000 <- coarse-0000"
    assert row["epochs"] == 6
    assert row["seconds"] == pytest.approx(sum(r["seconds"] for r in history))  # every segment counted
    assert len(df) == 4 and board.set_index("trial").loc["coarse-0001", "lineage"] == ""


def test_a_queued_promotion_shows_its_parent_until_it_has_a_score(store):
    _train(store, "coarse-0000", 2)
    spec = TrialSpec(experiment="exp", trial_id="medium-0000", stage="medium", dataset="spiral", model={},
                     solver={}, epochs=4, seed=1, params={}, data=DATA, parent="coarse-0000")
    store.write_spec(spec.to_dict())
    board = collapse_runs(store, build_leaderboard(store))
    assert list(board["trial"]) == ["coarse-0000"] and board["lineage"][0] == "medium-0000 <- coarse-0000"


def test_ensemble_top_k_takes_k_distinct_runs(store):
    for i in range(5):
        _train(store, f"coarse-000{i}", 2, lr=0.02 + 0.01 * i, seed=i + 1)
    _train(store, "medium-0000", 3, lr=0.06, seed=5, parent="coarse-0004")  # the best runs are promoted
    _train(store, "medium-0001", 3, lr=0.05, seed=4, parent="coarse-0003")
    assert len(build_leaderboard(store)) == 7
    record = build_ensemble(store, top=5, name="five")
    runs = chains(dict(store.iter_trials()))
    roots = [next(c[0] for c in runs.values() if t in c) for t in record["trials"]]
    assert len(record["trials"]) == 5 and len(set(roots)) == 5
    assert {"medium-0000", "medium-0001"} <= set(record["trials"])
    assert not {"coarse-0003", "coarse-0004"} & set(record["trials"])
    # snapshots of one run stay an explicit choice: more checkpoints per run, still five runs
    snap = build_ensemble(store, top=5, snapshots=2, name="five-snap")
    assert snap["trials"] == record["trials"] and len(snap["members"]) > 5


def test_the_report_of_a_promoted_run_draws_its_babysitting_section(store):
    _train(store, "coarse-0000", 2)
    _train(store, "medium-0000", 4, parent="coarse-0000")
    page = build_report(store).html.read_text()
    assert 'id="babysit-medium-0000"' in page and "medium-0000 &lt;- coarse-0000" in page
