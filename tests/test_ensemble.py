"""Ensembles: hand-computed averaging, deterministic greedy selection, skipped corrupt checkpoints, predict errors."""
import json

import numpy as np
import pytest

from master.ensemble import EnsembleError, build_ensemble, greedy_selection, predict
from nncore.data import load_dataset
from nncore.losses import softmax
from nncore.model import Model
from conftest import NullControl, record_experiment
from worker.spec import TrialSpec
from worker.store import ExperimentStore, load_npz
from worker.trainer import run_trial

SPIRAL = {"seed": 3, "val_fraction": 0.2, "test_fraction": 0.2, "preprocess": "standardize"}


def _train(store, tid, hidden, lr, epochs=3, dataset="spiral", data=SPIRAL, seed=1):
    spec = TrialSpec(experiment=store.experiment, trial_id=tid, stage="coarse", dataset=dataset,
                     model={"hidden": hidden}, solver={"update": "adam", "lr": lr, "batch_size": 32},
                     epochs=epochs, seed=seed, params={"solver.lr": lr}, data=data, keep=2)
    return run_trial(spec, store, NullControl())


@pytest.fixture()
def store(tmp_path):
    s = ExperimentStore(tmp_path, "exp").ensure()
    _train(s, "coarse-0000", [16], 0.05)
    _train(s, "coarse-0001", [8], 0.02, seed=2)
    _train(s, "coarse-0002", [4], 1e-4, seed=3)  # barely trained: last of the three
    return s


def _hand_proba(store, tid, x):
    """Softmax output of the trial's best checkpoint, rebuilt by hand from its arrays."""
    path = store.checkpoints(tid)[0].path
    arrays = load_npz(path)
    spec = json.loads(arrays["__spec__"].item())
    params = {k[len("param."):]: v for k, v in arrays.items() if k.startswith("param.")}
    model = Model(spec["model"], (2,), 3, params, {})
    return softmax(model.scores(x))


def test_average_of_two_models_equals_the_hand_computed_mean(store, tmp_path):
    record = build_ensemble(store, top=2, name="pair")
    assert [m["trial"] for m in record["members"]] == record["trials"]
    assert [m["weight"] for m in record["members"]] == [0.5, 0.5]
    data = load_dataset("spiral", **SPIRAL)
    mean = {split: (_hand_proba(store, record["trials"][0], getattr(data, f"x_{split}"))
                    + _hand_proba(store, record["trials"][1], getattr(data, f"x_{split}"))) / 2
            for split in ("val", "test")}
    for split in ("val", "test"):
        expected = float(np.mean(mean[split].argmax(1) == getattr(data, f"y_{split}")))
        assert record["scores"][split]["ensemble"] == pytest.approx(expected)
    # predict takes raw inputs and applies the training split's preprocessing itself
    raw = load_dataset("spiral", **{**SPIRAL, "preprocess": "none"})
    np.savez(tmp_path / "x.npz", x=raw.x_val)
    out = predict(store, tmp_path / "x.npz", tmp_path / "preds.npz", ensemble="pair")
    np.testing.assert_allclose(out["proba"], mean["val"], rtol=1e-5, atol=1e-6)
    with np.load(tmp_path / "preds.npz", allow_pickle=False) as saved:
        assert sorted(saved.files) == ["classes", "pred", "proba"]
        np.testing.assert_array_equal(saved["classes"], [0, 1, 2])
        np.testing.assert_array_equal(saved["pred"], mean["val"].argmax(1))


def test_predict_answers_in_the_dataset_s_own_labels(tmp_path):
    """A dataset labelled 3/7/9 is trained on classes 0..2; predict maps its answers back to 3/7/9."""
    raw = load_dataset("spiral", seed=0, val_fraction=0.2, test_fraction=0.2, preprocess="none")
    labels = np.array([3, 7, 9])
    np.savez(tmp_path / "d.npz", x=raw.x_train, y=labels[raw.y_train])
    data = {**SPIRAL, "preprocess": "standardize"}
    store = ExperimentStore(tmp_path, "exp").ensure()
    _train(store, "coarse-0000", [16], 0.05, dataset=f"npz:{tmp_path / 'd.npz'}", data=data)
    np.savez(tmp_path / "x.npz", x=raw.x_val)
    out = predict(store, tmp_path / "x.npz", tmp_path / "p.npz", trial="coarse-0000")
    np.testing.assert_array_equal(out["classes"], labels)
    np.testing.assert_array_equal(out["pred"], labels[out["proba"].argmax(1)])
    assert np.mean(out["pred"] == labels[raw.y_val]) > 0.5  # a trained model's answers, in the original labels


def test_record_names_members_weights_and_scores(store):
    record = build_ensemble(store, top=3, method="greedy")
    assert record["name"] == "top3-greedy"
    on_disk = json.loads((store.ensembles_dir / "top3-greedy.json").read_text())
    assert on_disk == json.loads(json.dumps(record))
    assert sum(m["weight"] for m in record["members"]) == pytest.approx(1.0)
    best = max(record["members"], key=lambda m: m["val_acc"])
    assert record["best_single"] == best["trial"]
    for split in ("val", "test"):
        s = record["scores"][split]
        assert s["best_single"] == best[f"{split}_acc"]
        assert s["gain"] == pytest.approx(s["ensemble"] - s["best_single"])
    assert not list(store.ensembles_dir.glob("*.tmp"))


def test_snapshots_and_ema_members(store):
    record = build_ensemble(store, top=2, snapshots=2, ema=True)
    assert record["name"] == "top2-average-ema-snap2" and record["ema"] is True
    assert len(record["members"]) == 4
    assert [m["trial"] for m in record["members"]] == [record["trials"][0]] * 2 + [record["trials"][1]] * 2
    assert len({(m["trial"], m["checkpoint"]) for m in record["members"]}) == 4


def test_greedy_selection_is_deterministic_and_picks_with_replacement():
    y = np.array([0, 1, 2, 0, 1, 2])
    strong = np.eye(3)[y] * 0.8 + 0.2 / 3  # always right
    weak = np.full((6, 3), 1 / 3)
    weak[:, 0] += 0.1  # right only on class 0
    probas = np.stack([weak, strong, weak.copy()])
    counts = greedy_selection(probas, y, rounds=10)
    assert counts.tolist() == [0, 1, 0]  # the strong model alone is best; adding weak ones never helps
    rng = np.random.default_rng(0)
    noisy = rng.dirichlet(np.ones(4), size=(7, 50))
    labels = rng.integers(0, 4, 50)
    first = greedy_selection(noisy, labels)
    assert np.array_equal(first, greedy_selection(noisy.copy(), labels.copy()))
    assert first.sum() >= 1 and (first >= 0).all()


def test_a_corrupt_best_checkpoint_is_skipped_with_a_warning(store, caplog):
    best = store.checkpoints("coarse-0000")[0]
    best.path.write_bytes(b"not a zip file")
    record = build_ensemble(store, top=3)
    assert str(best.path) in caplog.text
    member = next(m for m in record["members"] if m["trial"] == "coarse-0000")
    assert member["checkpoint"] != best.path.name


def test_predict_refuses_bad_inputs_with_clear_errors(store, tmp_path):
    build_ensemble(store, top=2, name="pair")
    out = tmp_path / "p.npz"
    np.savez(tmp_path / "narrow.npz", x=np.zeros((5, 3), np.float32))
    with pytest.raises(EnsembleError, match=r"narrow.npz: x has samples of shape \(3,\), the model expects \(2,\)$"):
        predict(store, tmp_path / "narrow.npz", out, ensemble="pair")
    np.savez(tmp_path / "obj.npz", x=np.array([[1, "a"]], dtype=object))
    with pytest.raises(EnsembleError, match="obj.npz: x is an object array"):
        predict(store, tmp_path / "obj.npz", out, trial="coarse-0001")
    np.savez(tmp_path / "other.npz", data=np.zeros((2, 2)))
    with pytest.raises(EnsembleError, match=r"other.npz: no array 'x' \(arrays: data\)"):
        predict(store, tmp_path / "other.npz", out, trial="coarse-0001")
    with pytest.raises(EnsembleError, match="ensemble nope: no readable .* \\(ensembles: pair\\)"):
        predict(store, tmp_path / "other.npz", out, ensemble="nope")
    with pytest.raises(EnsembleError, match="exactly one of"):
        predict(store, tmp_path / "other.npz", out)
    assert not out.exists()


def test_members_trained_on_different_data_are_refused(store):
    _train(store, "coarse-0003", [16], 0.05, data={**SPIRAL, "seed": 4})
    (store.trial_dir("coarse-0001") / "result.json").unlink()  # keep the order: 0003 ranks among the top
    with pytest.raises(EnsembleError, match="trained on different data"):
        build_ensemble(store, top=4)


@pytest.mark.slow
def test_top5_ensemble_of_a_real_digits_search_is_at_least_the_best_single_model_on_test(tmp_path):
    from master.sampler import sample_trials
    from master.config import parse_config

    config = parse_config("""
        [experiment]
        name = "ens"
        dataset = "digits"
        [solver]
        update = "adam"
        batch_size = 64
        [stages.coarse]
        epochs = 8
        trials = 8
        [space.solver]
        lr = { dist = "loguniform", low = 1e-3, high = 2e-2 }
        reg = { dist = "loguniform", low = 1e-5, high = 1e-2 }
        [space.model]
        hidden = { dist = "choice", values = [[32], [64]] }
        dropout = { dist = "uniform", low = 0.0, high = 0.3 }
    """)
    store = ExperimentStore(tmp_path, "ens").ensure()
    for spec in sample_trials(config, "coarse", 8):
        run_trial(spec, store, NullControl())
    record = build_ensemble(store, top=5)
    assert len(record["trials"]) == 5
    assert record["scores"]["test"]["ensemble"] >= record["scores"]["test"]["best_single"]


def test_cli_ensemble_and_predict(store, tmp_path):
    from click.testing import CliRunner

    from master.cli import main

    record_experiment(store)
    base = ["--storage", str(store.root), "--experiment", "exp"]
    runner = CliRunner()
    done = runner.invoke(main, ["ensemble", *base, "--top", "2", "--method", "greedy", "--name", "g2"])
    assert done.exit_code == 0, done.output
    assert "gain over" in done.output and (store.ensembles_dir / "g2.json").is_file()
    raw = load_dataset("spiral", **{**SPIRAL, "preprocess": "none"})
    np.savez(tmp_path / "x.npz", x=raw.x_test)
    done = runner.invoke(main, ["predict", *base, "--ensemble", "g2", "--input", str(tmp_path / "x.npz"),
                                "--output", str(tmp_path / "p.npz")])
    assert done.exit_code == 0, done.output
    with np.load(tmp_path / "p.npz", allow_pickle=False) as p:
        assert p["proba"].shape == (len(raw.x_test), 3) and p["pred"].dtype == np.int64
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 3)))
    done = runner.invoke(main, ["predict", *base, "--trial", "coarse-0000", "--input", str(tmp_path / "bad.npz"),
                                "--output", str(tmp_path / "q.npz")])
    assert done.exit_code == 2
    assert f"{tmp_path / 'bad.npz'}: x has samples of shape (3,), the model expects (2,)" in done.output
    assert not (tmp_path / "q.npz").exists()
