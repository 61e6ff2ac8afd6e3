"""Tests for the shared-storage layout: atomic writes, checkpoint naming, pruning, scanning."""
import json
import os

import numpy as np
import pytest

from worker.spec import SpecError
from worker.store import (
    Checkpoint,
    ExperimentStore,
    StorageError,
    atomic_write_json,
    list_experiments,
    load_npz,
    read_json,
    storage_root,
)
from conftest import record_experiment, record_result


@pytest.fixture
def store(tmp_path):
    return ExperimentStore(tmp_path, "exp").ensure()


def test_checkpoint_name_round_trip():
    name = Checkpoint.filename(0.91234, 5)
    assert name == "val0.9123_ep005.npz"
    c = Checkpoint.parse(__import__("pathlib").Path(name))
    assert (c.val_acc, c.epoch) == (0.9123, 5)
    assert Checkpoint.filename(1.0, 123) == "val1.0000_ep123.npz"
    assert Checkpoint.parse(__import__("pathlib").Path("val0.9123_ep005.npz.tmp")) is None


def test_names_with_traversal_are_refused(tmp_path):
    with pytest.raises(SpecError, match="experiment"):
        ExperimentStore(tmp_path, "../../etc")
    store = ExperimentStore(tmp_path, "ok")
    for bad in ("../x", "a/b", "..", ""):
        with pytest.raises(SpecError, match="trial_id"):
            store.trial_dir(bad)


def test_atomic_write_leaves_no_temp_and_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"x": 1})
    with pytest.raises(ValueError):
        atomic_write_json(path, {"x": float("nan")})  # allow_nan=False refuses before replacing
    assert json.loads(path.read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_checkpoints_keep_best_plus_latest(store):
    accs = [0.5, 0.9, 0.7, 0.8, 0.6]
    for epoch, acc in enumerate(accs, 1):
        store.write_checkpoint("t-0001", epoch, acc, {"w": np.full(3, epoch, np.float32)}, keep=2)
    kept = store.checkpoints("t-0001")
    assert [(c.val_acc, c.epoch) for c in kept] == [(0.9, 2), (0.8, 4), (0.6, 5)]
    assert store.latest_checkpoint("t-0001").epoch == 5
    assert load_npz(store.latest_checkpoint("t-0001").path)["w"].tolist() == [5, 5, 5]


def test_rewritten_epoch_replaces_its_file(store):
    store.write_checkpoint("t", 1, 0.5, {"w": np.zeros(1)}, keep=3)
    store.write_checkpoint("t", 1, 0.6, {"w": np.ones(1)}, keep=3)
    assert [(c.val_acc, c.epoch) for c in store.checkpoints("t")] == [(0.6, 1)]


def test_corrupt_and_pickled_npz_are_refused(store, tmp_path):
    bad = tmp_path / "val0.5000_ep001.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(StorageError, match="val0.5000_ep001.npz"):
        load_npz(bad)
    obj = tmp_path / "obj.npz"
    np.savez(obj, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(StorageError, match="obj.npz"):
        load_npz(obj)


def test_history_append_replaces_rerun_epochs_and_skips_corrupt_lines(store, caplog):
    store.write_spec({"trial_id": "t", "x": 1})
    for e in (1, 2, 3):
        store.append_history("t", {"epoch": e, "val_acc": e / 10})
    store.append_history("t", {"epoch": 2, "val_acc": 0.99})  # resumed from epoch 1's checkpoint
    assert [(r["epoch"], r["val_acc"]) for r in store.read_history("t")] == [(1, 0.1), (2, 0.99)]
    path = store.trial_dir("t") / "history.jsonl"
    path.write_text(path.read_text() + "{broken\n")
    assert len(store.read_history("t")) == 2
    assert "1 corrupt line(s) of" in caplog.text and "(line 5)" in caplog.text


def test_read_json_warns_on_corrupt(tmp_path, caplog):
    p = tmp_path / "r.json"
    p.write_text("{")
    assert read_json(p) is None
    assert "r.json" in caplog.text
    assert read_json(tmp_path / "missing.json") is None


def test_unwritable_storage_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StorageError, match="not writable"):
        ExperimentStore(blocker, "exp").ensure()


def test_scanning(tmp_path, monkeypatch):
    a = ExperimentStore(tmp_path, "a").ensure()
    record_experiment(a)
    os.utime(a.dir / "experiment.json", (1, 1))
    b = ExperimentStore(tmp_path, "b").ensure()
    record_experiment(b)
    assert list_experiments(tmp_path) == ["b", "a"]
    b.write_spec({"trial_id": "coarse-0001"})
    (b.trials_dir / "junk").mkdir()
    assert b.trial_ids() == ["coarse-0001"]
    monkeypatch.setenv("HYPERSEARCH_STORAGE", str(tmp_path / "env"))
    assert storage_root(None) == tmp_path / "env"
    assert storage_root(tmp_path / "flag") == tmp_path / "flag"


def test_a_snapshot_reads_each_trial_file_once_and_agrees_with_storage(store, monkeypatch):
    import worker.store as module

    for i in range(3):
        tid = f"coarse-000{i}"
        store.write_spec({"trial_id": tid, "stage": "coarse"})
        record_result(store, tid, {"state": "COMPLETED", "best_val_acc": 0.5 + i / 10})
        store.append_history(tid, {"epoch": 1, "val_acc": 0.5})
    store.append_event("coarse-0001", {"event": "retry", "worker": "w1"})
    expected = [(tid, spec, store.read_result(tid), store.read_history(tid), store.read_events(tid))
                for tid, spec in store.iter_trials()]
    reads = []
    for name in ("read_json", "read_jsonl"):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda path, real=real: reads.append(path.name) or real(path))
    snap = store.snapshot()
    for _ in range(3):  # as master status does: leaderboard, border flags per stage, quarantine
        assert [(tid, spec, snap.read_result(tid), snap.read_history(tid), snap.read_events(tid))
                for tid, spec in snap.iter_trials()] == expected
    assert sorted(reads) == sorted(["spec.json", "result.json", "history.jsonl", "events.jsonl"] * 3)
    record_result(store, "coarse-0000", {"state": "FAILED"})
    assert snap.read_result("coarse-0000").state == "COMPLETED"  # a snapshot: later writes are not seen
