"""Leaderboard built from a synthetic shared storage: columns, sort order, unfinished trials, rendering."""
import math

import numpy as np
import pytest
from rich.console import Console

from master.catalog import experiments
from master.leaderboard import BASE_COLUMNS, _cell, build_leaderboard, param_columns, render_table, state_counts
from worker.store import ExperimentStore
from conftest import record_experiment, record_result, record_stage


def _trial(store, tid, stage, params, history=(), result=None, checkpoint=None):
    store.write_spec({"experiment": store.experiment, "trial_id": tid, "stage": stage, "params": params})
    for rec in history:
        store.append_history(tid, rec)
    if result is not None:
        record_result(store, tid, result)
    if checkpoint is not None:
        store.write_checkpoint(tid, checkpoint[0], checkpoint[1], {"w": np.zeros(2, np.float32)}, keep=3)


def _result(state, best, epoch, epochs, reason="", worker="w1", seconds=1.5):
    return {"state": state, "reason": reason, "best_val_acc": best, "best_epoch": epoch, "epochs_done": epochs,
            "worker": worker, "seconds": seconds, "finished_at": 0.0, "checkpoint": None}


@pytest.fixture()
def store(tmp_path):
    s = ExperimentStore(tmp_path, "exp").ensure()
    record_experiment(s)
    hist = lambda accs: [{"epoch": e, "train_acc": 0.5 + e / 10, "val_acc": a, "seconds": 1.0}  # noqa: E731
                         for e, a in enumerate(accs, 1)]
    _trial(s, "coarse-0000", "coarse", {"solver.lr": 0.01, "model.hidden": [64]},
           hist([0.80, 0.90, 0.85]), _result("COMPLETED", 0.90, 2, 3))
    _trial(s, "coarse-0001", "coarse", {"solver.lr": 0.003, "model.hidden": [128]},
           hist([0.95]), _result("COMPLETED", 0.95, 1, 1, worker="w2"))
    _trial(s, "coarse-0002", "coarse", {"solver.lr": 3.0, "model.hidden": [32]},
           [], _result("DIVERGED", None, None, 1, reason="nan loss at epoch 1"))
    _trial(s, "coarse-0003", "coarse", {"solver.lr": 0.02, "model.hidden": [16]},
           hist([0.70]), {"state": "RUNNING"}, checkpoint=(1, 0.70))
    _trial(s, "coarse-0004", "coarse", {"solver.lr": 0.05, "model.hidden": [8]})
    _trial(s, "fine-0000", "fine", {"solver.lr": 0.004, "solver.reg": 1e-4}, hist([0.97]),
           _result("KILLED", 0.97, 1, 1, reason="stopped by user"))
    return s


def test_columns_and_sort_order(store):
    df = build_leaderboard(store)
    assert list(df.columns[: len(BASE_COLUMNS)]) == BASE_COLUMNS
    assert param_columns(df) == ["model.hidden", "solver.lr", "solver.reg"]
    assert list(df["trial"]) == ["fine-0000", "coarse-0001", "coarse-0000", "coarse-0003",
                                 "coarse-0002", "coarse-0004"]
    assert df["val_acc"].iloc[0] == pytest.approx(0.97)
    assert math.isnan(df.loc[df.trial == "coarse-0002", "solver.reg"].item())


def test_finished_trial_row_uses_result_and_history(store):
    row = build_leaderboard(store).set_index("trial").loc["coarse-0000"]
    assert row["state"] == "COMPLETED" and row["stage"] == "coarse"
    assert row["val_acc"] == pytest.approx(0.90) and row["best_epoch"] == 2
    assert row["train_acc"] == pytest.approx(0.7)  # train acc at the best epoch, not the last
    # seconds: the history's epochs summed (every resume counts), not the last segment's 1.5 s in result.json
    assert row["epochs"] == 3 and row["seconds"] == pytest.approx(3.0) and row["worker"] == "w1"
    assert row["solver.lr"] == pytest.approx(0.01) and row["model.hidden"] == [64]


def test_unfinished_trials_inferred_or_from_progress(store):
    df = build_leaderboard(store).set_index("trial")
    assert df.loc["coarse-0003", "state"] == "RUNNING"
    assert df.loc["coarse-0003", "val_acc"] == pytest.approx(0.70) and df.loc["coarse-0003", "epochs"] == 1
    assert df.loc["coarse-0004", "state"] == "QUEUED" and df.loc["coarse-0004", "epochs"] == 0
    live = {"coarse-0004": {"state": "RUNNING", "worker": "w9", "epoch": "0"},
            "coarse-0000": {"state": "RUNNING"}}  # storage's result wins over stale progress
    df = build_leaderboard(store, live).set_index("trial")
    assert df.loc["coarse-0004", "state"] == "RUNNING" and df.loc["coarse-0004", "worker"] == "w9"
    assert df.loc["coarse-0000", "state"] == "COMPLETED"
    assert df.loc["coarse-0002", "reason"] == "nan loss at epoch 1"


def test_stage_filter_and_empty(store, tmp_path):
    assert set(build_leaderboard(store, stage="fine")["trial"]) == {"fine-0000"}
    empty = build_leaderboard(ExperimentStore(tmp_path, "nothing"))
    assert empty.empty and list(empty.columns) == BASE_COLUMNS
    assert render_table(empty).row_count == 0


def test_render_table(store):
    df = build_leaderboard(store)
    table = render_table(df, top=3)
    assert table.row_count == 3
    console = Console(record=True, width=250)
    console.print(table)
    text = console.export_text()
    assert "top 3 of 6 trials" in text
    assert "fine-0000" in text and "0.9700" in text and "stopped by user" in text
    assert "coarse-0004" not in text
    assert "lr" in text and "hidden" in text and "[128]" in text


def test_render_table_on_an_80_column_terminal_folds_values_instead_of_cropping_them(store):
    df = build_leaderboard(store)
    console = Console(record=True, width=80)
    console.print(render_table(df, top=6, width=80))
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines())
    cells = "".join(text.split())  # a folded value is whole once the table's spacing is gone
    for values in df.to_dict("records"):
        for name in param_columns(df):
            if values[name] == values[name]:
                assert f"{name.rsplit('.', 1)[-1]}={_cell(values[name])}" in cells
    assert "worker" not in text


def test_stages_are_listed_in_the_configs_order_not_by_their_best_trial_or_name(store):
    stages = "".join(f"[stages.{name}]\nepochs = 1\ntrials = 1\n" for name in ("coarse", "medium", "fine"))
    record_experiment(store, config_text=f'[experiment]\nname = "exp"\ndataset = "digits"\n{stages}')
    for stage in ("fine", "medium", "coarse"):
        record_stage(store, stage, [])
    console = Console(record=True, width=120)
    console.print(state_counts(build_leaderboard(store), store))  # fine-0000 is the best trial
    lines = [line.split() for line in console.export_text().splitlines()]
    rows = [cells[1] for cells in lines if cells[1:2] in (["coarse"], ["fine"])]
    assert rows == ["coarse", "fine"]
    assert experiments(store.root)[0]["state"] == "coarse launched, medium launched, fine launched"
