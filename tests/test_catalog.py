"""`master list` and `master best [--toml]`: experiments with their state and best run; the best config relaunchable."""
import json

from click.testing import CliRunner

from conftest import record_experiment, record_stage
from master.cli import main
from master.config import parse_config
from test_lineage import _train
from worker.store import ExperimentStore


def test_list_and_best_toml_relaunchable(tmp_path):
    store = ExperimentStore(tmp_path, "spiral").ensure()
    record_experiment(store)
    _train(store, "coarse-0000", 2, lr=0.05)
    _train(store, "coarse-0001", 2, lr=1e-4, seed=2)
    _train(store, "fine-0000", 4, parent="coarse-0000")
    record_stage(store, "coarse", ["coarse-0000", "coarse-0001"])
    record_experiment(ExperimentStore(tmp_path, "empty").ensure())
    runner = CliRunner()
    listed = runner.invoke(main, ["list", "--storage", str(tmp_path)], terminal_width=200)
    assert listed.exit_code == 0, listed.output
    line = next(line for line in listed.output.splitlines() if "spiral" in line)
    assert "coarse launched" in line and "3" in line and "(fine-0000)" in line
    assert "empty" in listed.output

    shown = runner.invoke(main, ["best", "--storage", str(tmp_path), "--experiment", "spiral"])
    assert shown.exit_code == 0, shown.output
    spec = json.loads(shown.output)
    assert spec["trial_id"] == "fine-0000" and spec["solver"]["lr"] == 0.05

    toml = runner.invoke(main, ["best", "--toml", "--storage", str(tmp_path), "--experiment", "spiral"])
    assert toml.exit_code == 0, toml.output
    assert "fine-0000 <- coarse-0000" in toml.output.splitlines()[0]
    config = parse_config(toml.output, "best.toml")
    assert config.name == "spiral-best" and config.dataset == "spiral" and config.space == ()
    assert config.stages[0].epochs == 4 and config.stages[0].trials == 1
    relaunched = config.trial_spec("final", 0, spec["seed"], {})
    assert relaunched.model == spec["model"] and relaunched.solver == {**spec["solver"], "epochs": 4}
    assert relaunched.data == spec["data"]


def test_best_of_an_experiment_without_scores_is_one_line_exit_2(tmp_path):
    store = ExperimentStore(tmp_path, "fresh").ensure()
    record_experiment(store)
    done = CliRunner().invoke(main, ["best", "--storage", str(tmp_path), "--experiment", "fresh"])
    assert done.exit_code == 2 and "no trial has a validation accuracy yet" in done.output


def test_list_of_a_missing_storage_root_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "file").write_text("")
    for root, why in ((tmp_path / "missing", "does not exist"), (tmp_path / "file", "not a directory")):
        listed = CliRunner().invoke(main, ["list", "--storage", str(root)])
        assert listed.exit_code == 2 and listed.output.strip().endswith(f"storage {root}: {why}")
        assert len(listed.output.strip().splitlines()) == 1
