"""Babysitting: the diagnosis rules, first-layer tiles, bounded records of a long trial, and the pictures of a real
conv2d run on the report page and the --trial page, checked in headless Chromium."""
import base64
import io
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.image import imread

from master.babysit import (dead_relus, diagnose, first_layer_tiles, histogram_figure, image_shape, loss_exploded,
                            loss_flat, loss_points, overfitting, ratio_off, smooth, weights_figure)
from master.cli import main
from master.report import build_report
from nncore.solver import BABYSIT_SNAPSHOTS, LOSS_TRACE_POINTS
from worker.spec import TrialSpec
from worker.store import ExperimentStore
from worker.trainer import run_trial
from conftest import NullControl, record_experiment

CHROMIUM = "/usr/bin/chromium"
FIGURES = ("loss", "accuracy", "activations", "gradients", "weights", "ratios")


def _trace(losses, start=0):
    """History records of one epoch each, holding consecutive loss_trace points."""
    return [{"epoch": e + 1, "loss_trace": [[start + e, v]]} for e, v in enumerate(losses)]


# the rules ---------------------------------------------------------------------------------------
def test_a_flat_loss_means_a_learning_rate_too_low_and_a_falling_one_does_not():
    flat = _trace(np.full(40, 2.3) + np.linspace(0, -0.05, 40))
    falling = _trace(2.3 * np.exp(-np.linspace(0, 3, 40)))
    assert "learning rate too low" in loss_flat(flat)
    assert loss_flat(falling) is None
    assert loss_flat(flat[:5]) is None  # too few points to judge


def test_an_exploding_loss_means_a_learning_rate_too_high():
    rising = _trace(np.geomspace(2.3, 50, 40))
    assert "learning rate too high" in loss_exploded(rising)
    assert loss_exploded(_trace([2.3, float("nan")])).startswith("non-finite")
    assert "nan loss at epoch 2" in loss_exploded([], "DIVERGED", "nan loss at epoch 2")
    assert loss_exploded(_trace(2.3 * np.exp(-np.linspace(0, 3, 40))), "COMPLETED") is None
    assert diagnose(rising) == [loss_exploded(rising)]  # an exploding loss is not also called flat


def test_a_large_gap_at_the_best_epoch_asks_for_more_regularization():
    history = [{"epoch": 1, "train_acc": 0.99, "val_acc": 0.80}, {"epoch": 2, "train_acc": 0.88, "val_acc": 0.85}]
    assert overfitting(history) is None  # the best epoch (2) has a gap of 0.03
    history[1]["train_acc"] = 1.0
    assert "gap 0.15 at epoch 2" in overfitting(history) and "regularization" in overfitting(history)


def test_update_ratios_far_from_1e_3_name_the_layer_and_direction():
    history = [{"epoch": e, "update_ratio": {"layer1": 1e-5, "layer2": 2e-3, "layer3": 0.3, "layer4": None}}
               for e in (1, 2, 3)]
    found = ratio_off(history)
    assert "layer1 1.0e-05" in found.split("below")[1] and "layer3 3.0e-01" in found.split("above")[1]
    assert "layer2" not in found and "layer4" not in found
    assert ratio_off([{"epoch": 1, "update_ratio": {"layer1": 1e-3, "layer2": 5e-3}}]) is None


def test_more_than_half_dead_relus_in_the_last_snapshot():
    def snap(epoch, dead):
        return {"epoch": epoch, "babysit": {"activations": {"conv1": {"dead_fraction": dead},
                                                            "layer1": {"dead_fraction": 0.1}}}}
    assert "conv1 62%" in dead_relus([snap(1, 0.1), snap(5, 0.62)])
    assert dead_relus([snap(1, 0.62), snap(5, 0.2)]) is None  # recovered by the last snapshot
    assert dead_relus([{"epoch": 1}]) is None


def test_smooth_and_loss_points():
    assert smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2).tolist() == [1.0, 2.0, 4.0, 6.0]
    history = [{"epoch": 2, "loss_trace": [[3, 0.5], [4, None]]}, {"epoch": 1, "loss_trace": [[0, 2.0]]},
               {"epoch": 3}]
    iterations, losses = loss_points(history)
    assert iterations.tolist() == [0, 3, 4] and losses[:2].tolist() == [2.0, 0.5] and np.isnan(losses[2])


# first-layer weights -----------------------------------------------------------------------------
def test_image_shapes_of_flat_inputs():
    assert image_shape(64) == (8, 8) and image_shape(256) == (16, 16) and image_shape(3072) == (3, 32, 32)
    assert image_shape(40) is None and image_shape(2) is None


def test_first_layer_tiles_of_each_architecture():
    w = np.arange(64 * 3, dtype=float).reshape(64, 3)  # an MLP on 8x8 images, 3 hidden units
    kind, tiles = first_layer_tiles({"param.W1": w, "param.W2": np.zeros((3, 2))})
    assert kind == "images" and tiles.shape == (3, 8, 8)
    assert tiles[1, 0, 1] > tiles[1, 0, 0] and tiles[1, 1, 0] == tiles[1, 0, 0] + 8 * tiles[1, 0, 1]  # row-major
    assert tiles.min() == 0.0 and tiles.max() == 1.0
    assert first_layer_tiles({"param.W1": np.zeros((40, 3))}) is None  # not an image
    kind, tiles = first_layer_tiles({"param.Wc1": np.random.default_rng(0).normal(size=(6, 3, 5, 5))})
    assert kind == "images" and tiles.shape == (6, 5, 5, 3)
    kind, tiles = first_layer_tiles({"param.Wc1": np.ones((80, 1, 3, 3))})
    assert kind == "images" and tiles.shape == (64, 3, 3) and (tiles == 0.5).all()  # capped, constant tiles grey
    kind, curves = first_layer_tiles({"param.Wc1": np.ones((4, 2, 5))})
    assert kind == "curves" and curves.shape == (4, 2, 5)
    fig = weights_figure((kind, curves))
    assert sum(len(ax.get_lines()) for ax in fig.axes) == 8  # one curve per filter and input channel


def test_histogram_figure_has_a_panel_per_layer_and_a_line_per_snapshot():
    hist = {"counts": [1, 5, 2], "edges": [0.0, 1.0, 2.0, 3.0], "dead_fraction": 0.25}
    history = [{"epoch": e, "babysit": {"activations": {"conv1": hist, "layer1": hist}}} for e in (1, 4)]
    fig = histogram_figure(history, "activations")
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == ["conv1 (dead 25%)", "layer1 (dead 25%)"]
    assert all(len(ax.patches) == 2 for ax in shown)
    assert histogram_figure(history, "gradients") is None


# bounded records ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_1000_epoch_trial_records_bounded_statistics(tmp_path):
    """Without the snapshot and trace schedules the history alone would pass 5 MB (a snapshot is ~5 KB a line)."""
    store = ExperimentStore(tmp_path, "long").ensure()
    spec = TrialSpec(experiment="long", trial_id="coarse-0000", stage="coarse", dataset="spiral",
                     model={"hidden": [8]}, solver={"update": "adam", "lr": 1e-2, "batch_size": 128}, epochs=1000,
                     seed=0, keep=2)
    assert run_trial(spec, store, NullControl()).epochs_done == 1000
    history = store.read_history("coarse-0000")
    assert len(history) == 1000
    assert [r["epoch"] for r in history if "babysit" in r] == [1, 4, 16, 63, 251, 1000]
    assert len(loss_points(history)[0]) <= LOSS_TRACE_POINTS and BABYSIT_SNAPSHOTS == 6
    files = {p.name: p.stat().st_size for p in store.trial_dir("coarse-0000").iterdir()}
    assert sum(1 for name in files if name.endswith(".npz")) <= 3  # keep 2 + the latest
    assert files["history.jsonl"] < 700_000, files  # ~430 KB measured: ~0.4 KB an epoch + 6 snapshots
    assert sum(files.values()) < 800_000, files


# a real conv2d run -------------------------------------------------------------------------------
def _spec(tid, model, epochs=3, lr=3e-3):
    return TrialSpec(experiment="shapes", trial_id=tid, stage="coarse", dataset="shapes", model=model,
                     solver={"update": "adam", "lr": lr, "batch_size": 64}, epochs=epochs, seed=1,
                     params={"solver.lr": lr}, data={"preprocess": "standardize"}, keep=1)


@pytest.fixture(scope="module")
def conv_run(tmp_path_factory):
    """A small conv2d trial and an MLP trial on the built-in shapes, trained in-process, and their report."""
    store = ExperimentStore(tmp_path_factory.mktemp("babysit"), "shapes").ensure()
    record_experiment(store, {"stages": {"coarse": {"epochs": 3, "trials": 2}},
                              "space": {"solver": {"lr": {"dist": "loguniform", "low": 1e-3, "high": 1e-2}}}})
    run_trial(_spec("coarse-0000", {"arch": "conv2d", "conv_channels": [6], "conv_kernel": 3, "hidden": [16]}),
              store, NullControl())
    run_trial(_spec("coarse-0001", {"arch": "mlp", "hidden": [16]}, lr=1e-3), store, NullControl())
    return store, build_report(store).html


def _images(page, trial):
    """{figure: decoded RGB pixels} of the trial's babysitting images on the page."""
    found = dict(re.findall(rf'<img id="babysit-{trial}-(\w+)" alt="[^"]*" src="data:image/png;base64,([^"]+)"',
                            page))
    return {name: imread(io.BytesIO(base64.b64decode(data)))[..., :3] for name, data in found.items()}


def test_every_babysitting_figure_is_on_the_page_and_not_blank(conv_run):
    page = conv_run[1].read_text()
    for trial in ("coarse-0000", "coarse-0001"):
        images = _images(page, trial)
        assert sorted(images) == sorted(FIGURES), trial
        for name, pixels in images.items():
            assert pixels.std() > 0.02 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 8, (trial, name)
        assert re.search(rf'id="babysit-{trial}".*?<b>Diagnosis:</b> [^<]+</p>', page)
    conv_weights = _images(page, "coarse-0000")["weights"]
    mlp_weights = _images(page, "coarse-0001")["weights"]
    assert conv_weights.shape != mlp_weights.shape  # 6 3x3 filters vs 16 units as 16x16 images


def test_report_trial_page_and_a_missing_trial(conv_run):
    store = conv_run[0]
    done = CliRunner().invoke(main, ["report", "--storage", str(store.root), "--experiment", "shapes",
                                     "--trial", "coarse-0000"])
    assert done.exit_code == 0, done.output
    page_path = store.report_dir / "trial-coarse-0000.html"
    assert str(page_path) in done.output
    assert sorted(_images(page_path.read_text(), "coarse-0000")) == sorted(FIGURES)
    done = CliRunner().invoke(main, ["report", "--storage", str(store.root), "--experiment", "shapes",
                                     "--trial", "coarse-0099"])
    assert done.exit_code == 2
    assert done.output.strip().splitlines() == [
        "Error: trial coarse-0099: not found in experiment shapes (2 trials there)"]


@pytest.mark.slow
def test_trial_page_renders_in_headless_chromium(conv_run, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium); the page was not rendered")
    store, _ = conv_run
    CliRunner().invoke(main, ["report", "--storage", str(store.root), "--experiment", "shapes", "--trial",
                              "coarse-0000"])
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1400,2000",
           (store.report_dir / "trial-coarse-0000.html").resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert shot.is_file(), done.stderr[-2000:]
    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1400)
    rows = pixels.std(axis=(1, 2))
    assert (rows > 0.01).mean() > 0.6  # the six figures fill most of the height: they were decoded and drawn
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
