"""Tests for run_trial: results, per-epoch checkpoints and history, exact resume, promotion, stops, failures."""
import json

import numpy as np
import pytest

from nncore.errors import DataError
from worker.control import StopJob
from conftest import NullControl, record_result
from worker.spec import TrialSpec
from worker.states import TrialState
from worker.store import ExperimentStore
from worker.trainer import run_trial


def make_spec(trial_id="coarse-0001", **overrides):
    fields = dict(experiment="exp", trial_id=trial_id, stage="coarse", dataset="digits",
                  model={"hidden": [32]}, solver={"update": "momentum", "lr": 0.01, "batch_size": 64},
                  epochs=4, seed=3, keep=2, data={"preprocess": "standardize"})
    fields.update(overrides)
    return TrialSpec(**fields)


class StopAfter(NullControl):
    """A control that asks to stop once `epochs` epochs have been reported; records every report."""

    def __init__(self, epochs=None, reason="stopped by user"):
        self.epochs, self.reason, self.reports = epochs, reason, []

    def should_stop(self):
        done = max((r["epoch"] for r in self.reports if "epoch" in r), default=0)
        return self.reason if self.epochs is not None and done >= self.epochs else None

    def report(self, fields):
        self.reports.append(dict(fields))


@pytest.fixture
def store(tmp_path):
    return ExperimentStore(tmp_path, "exp").ensure()


def params_of(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k.startswith(("param.", "ema.", "opt."))}


def assert_consistent(store, tid, result):
    """File-name accuracy == round(history val_acc, 4) == result.json's best_val_acc, for the best checkpoint."""
    history = {r["epoch"]: r for r in store.read_history(tid)}
    for ckpt in store.checkpoints(tid):
        assert ckpt.val_acc == round(history[ckpt.epoch]["val_acc"], 4)
    best = store.checkpoints(tid)[0]
    assert result.checkpoint == best.path.name
    assert result.best_val_acc == best.val_acc and result.best_epoch == best.epoch
    assert store.read_result(tid) == result
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()


def test_completed_trial_writes_history_checkpoints_and_result(store):
    control = StopAfter()
    result = run_trial(make_spec(), store, control, worker_name="w1")
    assert result.state == "COMPLETED" and result.epochs_done == 4 and result.worker == "w1"
    assert result.seconds > 0 and result.finished_at > 0 and result.reason
    history = store.read_history("coarse-0001")
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert {"train_loss", "val_acc", "ema_val_acc", "lr", "samples_per_sec", "time"} <= set(history[0])
    assert len(store.checkpoints("coarse-0001")) <= 3  # keep=2 best plus the latest
    assert store.latest_checkpoint("coarse-0001").epoch == 4
    assert_consistent(store, "coarse-0001", result)
    assert store.read_spec("coarse-0001") == make_spec().to_dict()
    with np.load(store.latest_checkpoint("coarse-0001").path, allow_pickle=False) as z:
        assert json.loads(str(z["__spec__"])) == make_spec().to_dict()
        assert {"param.W1", "ema.W1", "opt.W1.v", "epoch"} <= set(z.files)
    states = [r["state"] for r in control.reports if "state" in r]
    assert states == ["RUNNING", "COMPLETED"]
    epochs = [r for r in control.reports if "val_acc" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert {"train_loss", "initial_loss", "last_loss", "samples_per_sec", "best_val_acc"} <= set(epochs[-1])


def test_resume_after_a_stop_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path):
    straight = ExperimentStore(tmp_path / "a", "exp").ensure()
    run_trial(make_spec(), straight, NullControl())

    resumed = ExperimentStore(tmp_path / "b", "exp").ensure()
    first = run_trial(make_spec(), resumed, StopAfter(epochs=2))
    assert first.state == "KILLED" and first.reason == "stopped by user" and first.epochs_done == 2
    assert_consistent(resumed, "coarse-0001", first)
    control = StopAfter()
    second = run_trial(make_spec(), resumed, control)
    assert second.state == "COMPLETED" and second.epochs_done == 4
    assert [r["epoch"] for r in control.reports if "val_acc" in r] == [3, 4]  # epochs 1-2 were not re-run

    a = params_of(straight.latest_checkpoint("coarse-0001").path)
    b = params_of(resumed.latest_checkpoint("coarse-0001").path)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    drop_time = lambda h: [{k: v for k, v in r.items() if k not in ("time", "seconds", "samples_per_sec")} for r in h]
    assert drop_time(straight.read_history("coarse-0001")) == drop_time(resumed.read_history("coarse-0001"))


def test_history_past_the_latest_checkpoint_is_dropped_on_resume(store):
    run_trial(make_spec(epochs=2), store, NullControl())
    records = store.read_history("coarse-0001")
    store.write_history("coarse-0001", records + [{**records[-1], "epoch": 3}])  # died after history, before ckpt
    spec = make_spec(epochs=4)
    result = run_trial(spec, store, StopAfter(epochs=2))  # stopped again before finishing epoch 3
    assert result.state == "KILLED" and result.epochs_done == 2
    assert [r["epoch"] for r in store.read_history("coarse-0001")] == [1, 2]
    assert_consistent(store, "coarse-0001", result)


def test_promotion_starts_from_the_parent_and_matches_a_straight_run(tmp_path):
    straight = ExperimentStore(tmp_path / "a", "exp").ensure()
    run_trial(make_spec(trial_id="fine-0001", stage="fine"), straight, NullControl())

    store = ExperimentStore(tmp_path / "b", "exp").ensure()
    run_trial(make_spec(epochs=2), store, NullControl())
    child = make_spec(trial_id="fine-0001", stage="fine", parent="coarse-0001")
    control = StopAfter()
    result = run_trial(child, store, control)
    assert result.state == "COMPLETED" and result.epochs_done == 4
    assert [r["epoch"] for r in control.reports if "val_acc" in r] == [3, 4]
    assert [r["epoch"] for r in store.read_history("fine-0001")] == [1, 2, 3, 4]
    assert store.read_history("fine-0001")[:2] == store.read_history("coarse-0001")
    assert_consistent(store, "fine-0001", result)
    a = params_of(straight.latest_checkpoint("fine-0001").path)
    b = params_of(store.latest_checkpoint("fine-0001").path)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_promotion_with_no_further_epochs_still_has_its_own_checkpoint(store):
    run_trial(make_spec(epochs=2), store, NullControl())
    result = run_trial(make_spec(trial_id="fine-0001", stage="fine", parent="coarse-0001", epochs=2), store,
                       NullControl())
    assert result.state == "COMPLETED" and result.epochs_done == 2
    assert result.checkpoint in {c.path.name for c in store.checkpoints("fine-0001")}
    assert_consistent(store, "fine-0001", result)


def test_a_parent_without_checkpoints_means_training_from_scratch(store, caplog):
    result = run_trial(make_spec(trial_id="fine-0001", stage="fine", parent="coarse-0009", epochs=1), store,
                       NullControl())
    assert result.state == "COMPLETED" and result.epochs_done == 1
    assert "has no checkpoint" in caplog.text


def test_divergence_is_recorded(store):
    spec = make_spec(solver={"update": "sgd", "lr": 1e4, "batch_size": 64})
    result = run_trial(spec, store, NullControl())
    assert result.state == "DIVERGED"
    assert "loss" in result.reason and "epoch 1" in result.reason
    assert store.read_result("coarse-0001").state == "DIVERGED"


def test_an_exception_is_recorded_as_failed_and_reraised(store, tmp_path):
    spec = make_spec(dataset=f"npz:{tmp_path}/missing.npz")
    control = StopAfter()
    with pytest.raises(DataError):
        run_trial(spec, store, control)
    result = store.read_result("coarse-0001")
    assert result.state == "FAILED" and result.reason.startswith("DataError: ")
    assert result.checkpoint is None and result.epochs_done == 0
    assert control.reports[-1]["state"] == "FAILED"


def test_stopjob_is_recorded_as_killed_and_reraised(store):
    class Interrupting(StopAfter):
        """Raises StopJob once after epoch 1 (as the worker's interrupt would), then reports the request."""

        def should_stop(self):
            if self.epochs is not None:
                return self.reason
            if any(r.get("epoch") == 1 for r in self.reports):
                self.epochs, self.reason = 1, "stopped by user (RQ stop-job command)"
                raise StopJob()
            return None

    with pytest.raises(StopJob):
        run_trial(make_spec(), store, Interrupting())
    result = store.read_result("coarse-0001")
    assert result.state == "KILLED" and result.epochs_done == 1
    assert result.reason == "stopped by user (RQ stop-job command)"


def test_a_failed_sanity_check_fails_the_trial_before_training(store):
    spec = make_spec(solver={"update": "sgd", "lr": 1e-9, "batch_size": 64}, sanity=True)
    result = run_trial(spec, store, NullControl())
    assert result.state == "FAILED" and result.reason.startswith("sanity check overfit failed")
    assert [s["name"] for s in result.sanity] == ["initial_loss", "regularization", "overfit"]
    assert store.checkpoints("coarse-0001") == []


def test_passing_sanity_checks_are_recorded(store):
    result = run_trial(make_spec(epochs=1, sanity=True), store, NullControl())
    assert result.state == "COMPLETED" and all(s["ok"] for s in result.sanity)


def test_a_stale_result_is_cleared_while_the_trial_runs(store):
    store.write_spec(make_spec().to_dict())
    record_result(store, "coarse-0001", {"state": "KILLED"})
    seen = []

    class Peek(StopAfter):
        def report(self, fields):
            seen.append(store.read_result("coarse-0001"))

    run_trial(make_spec(epochs=1), store, Peek())
    assert seen[0].state == "RUNNING" and store.read_result("coarse-0001").state == "COMPLETED"


def test_temp_files_a_killed_writer_left_are_removed_when_the_trial_starts_again(store):
    spec = make_spec()
    run_trial(spec, store, NullControl())
    d = store.trial_dir(spec.trial_id)
    stale = [d / "val0.5000_ep001.npz.0a1b2c3d.tmp", d / "result.json.ffffffff.tmp"]
    for path in stale:
        path.write_bytes(b"half a write")  # what a SIGKILLed worker leaves between writing and renaming
    store.transition(spec.trial_id, TrialState.QUEUED, "requeued", "requeue")
    run_trial(spec, store, NullControl())
    assert not any(path.exists() for path in stale) and not list(d.glob("*.tmp"))
    assert store.read_result(spec.trial_id).state == "COMPLETED"
