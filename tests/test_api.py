"""The Python API (master.api): the same search as `master launch`, the leaderboard's columns and dtypes, histories,
and models and ensembles whose predictions equal `master predict`'s."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import master.api as hypersearch
from master.cli import main
from master.experiment import ExperimentError

pytestmark = pytest.mark.slow

CONFIG = """\
[experiment]
name = "api-digits"
dataset = "digits"
seed = 3

[solver]
update = "adam"
batch_size = 64

[stages.coarse]
epochs = 2
trials = 3
prune = "none"

[space.solver]
lr = { dist = "loguniform", low = 1e-3, high = 1e-2 }

[space.model]
hidden = { dist = "choice", values = [[16], [32]] }
dropout = { dist = "uniform", low = 0.0, high = 0.3 }
"""


def specs(root):
    """{trial id: spec.json} of the experiment under ``root``."""
    trials = root / "api-digits" / "trials"
    return {p.name: json.loads((p / "spec.json").read_text()) for p in sorted(trials.iterdir())}


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """(config path, storage root) of a search run by `master launch` in a subprocess (embedded Redis)."""
    base = tmp_path_factory.mktemp("api")
    config, root = base / "search.toml", base / "cli"
    config.write_text(CONFIG)
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "HYPERSEARCH_STORAGE")}
    done = subprocess.run([sys.executable, "-m", "master.cli", "launch", "--config", str(config), "--storage",
                           str(root), "--workers", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return config, root


@pytest.fixture(scope="module")
def exp(searched):
    return hypersearch.open(searched[1] / "api-digits")


def test_launch_from_python_runs_the_same_search_as_the_cli(searched, tmp_path, monkeypatch):
    config, cli_root = searched
    monkeypatch.delenv("REDIS_URL", raising=False)
    exp = hypersearch.launch(config, storage=tmp_path, workers=1)
    assert exp.name == "api-digits" and exp.path == tmp_path / "api-digits"
    assert specs(tmp_path) == specs(cli_root)
    assert set(exp.leaderboard()["state"]) == {"COMPLETED"}


def test_open_takes_the_experiment_folder_or_the_root_and_a_name(searched, exp):
    assert hypersearch.open(searched[1], "api-digits").path == exp.path
    assert hypersearch.open(searched[1]).name == "api-digits"  # the most recently changed one
    with pytest.raises(ExperimentError, match="experiment nope: not found"):
        hypersearch.open(searched[1], "nope")


def test_leaderboard_has_one_row_per_trial_hyperparameters_as_columns_and_typed(exp):
    df = exp.leaderboard()
    assert len(df) == 3 and list(df["trial"]) == sorted(df["trial"], key=lambda t: -df.set_index("trial").val_acc[t])
    assert {"model.dropout", "model.hidden", "solver.lr"} <= set(df.columns)
    assert df["trial"].dtype == "string" and df["stage"].dtype == "string" and df["worker"].dtype == "string"
    assert isinstance(df["state"].dtype, pd.CategoricalDtype) and "KILLED" in df["state"].cat.categories
    for column in ("val_acc", "train_acc", "seconds", "solver.lr", "model.dropout"):
        assert df[column].dtype == "float64", column
    assert df["epochs"].dtype == "Int64" and df["best_epoch"].dtype == "Int64"
    assert df["model.hidden"].dtype == object and all(isinstance(v, list) for v in df["model.hidden"])
    assert exp.leaderboard(stage="nope").empty


def test_best_and_history(exp):
    best = exp.best(2)
    assert len(best) == 2 and best["val_acc"].iloc[0] == exp.leaderboard()["val_acc"].max()
    history = exp.history(best["trial"].iloc[0])
    assert list(history.index) == [1, 2] and history.index.name == "epoch"
    assert history["val_acc"].dtype == "float64" and history["val_acc"].max() == pytest.approx(best["val_acc"][0],
                                                                                                  abs=1e-4)
    assert any(c.startswith("update_ratio.") for c in history.columns) and "loss_trace" in history.columns
    assert exp.events(best["trial"].iloc[0])["event"].tolist()[-1] == "finished"
    with pytest.raises(ExperimentError, match="trial coarse-9999: not in experiment api-digits"):
        exp.history("coarse-9999")


def predict_cli(exp, tmp_path, *args):
    x = np.random.default_rng(0).uniform(0, 16, size=(40, 64))
    np.savez(tmp_path / "x.npz", x=x)
    out = tmp_path / "preds.npz"
    result = CliRunner().invoke(main, ["predict", "--storage", str(exp.store.root), "--experiment", exp.name,
                                       "--input", str(tmp_path / "x.npz"), "--output", str(out), *args])
    assert result.exit_code == 0, result.output
    with np.load(out) as z:
        return x, z["proba"], z["pred"]


@pytest.mark.parametrize("ema", [False, True])
def test_a_loaded_model_predicts_what_master_predict_does(exp, tmp_path, ema):
    trial = exp.best(1)["trial"][0]
    x, proba, pred = predict_cli(exp, tmp_path, "--trial", trial, *(["--ema"] if ema else []))
    model = exp.load_model(trial, ema=ema)
    np.testing.assert_array_equal(model.predict_proba(x), proba)
    np.testing.assert_array_equal(model.predict(x), pred)
    assert model.spec.trial_id == trial and set(model.params) == set(model.model.params)


def test_an_ensemble_predicts_what_master_predict_does(exp, tmp_path):
    made = CliRunner().invoke(main, ["ensemble", "--storage", str(exp.store.root), "--experiment", exp.name,
                                     "--top", "2", "--name", "pair"])
    assert made.exit_code == 0, made.output
    x, proba, pred = predict_cli(exp, tmp_path, "--ensemble", "pair")
    ensemble = exp.ensemble("pair")
    np.testing.assert_array_equal(ensemble.predict_proba(x), proba)
    np.testing.assert_array_equal(ensemble.predict(x), pred)
    assert len(ensemble.members) == 2 and "pair" in exp.ensembles()
