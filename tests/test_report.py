"""The report from a synthetic storage with corrupt, partial and foreign files: files, columns, plots, browser view."""
import csv
import json
import logging
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from master.leaderboard import BASE_COLUMNS
from master.report import build_report, curves_figure, numeric_params, read_context, scatter_figure
from worker.store import ExperimentStore
from conftest import record_experiment, record_result, record_stage

CHROMIUM = "/usr/bin/chromium"
SPACE = {"solver": {"lr": {"dist": "loguniform", "low": 1e-4, "high": 1e-1}},
         "model": {"dropout": {"dist": "uniform", "low": 0.0, "high": 0.5},
                   "hidden": {"dist": "choice", "values": [[32], [64]]}}}
PLOTS = ("funnel", "hyperparameters", "choice-model-hidden", "curves", "ratios")


def _history(epochs, peak, lr):
    rng = np.random.default_rng(int(peak * 1000))
    acc = peak * (1 - np.exp(-np.arange(1, epochs + 1) / 2))
    return [{"epoch": e, "train_loss": 2.3 / e, "val_loss": 2.4 / e, "train_acc": min(1.0, a + 0.03),
             "val_acc": a, "lr": lr, "seconds": 0.5,
             "update_ratio": {"layer1": float(lr * rng.uniform(0.5, 2)), "layer2": float(lr * rng.uniform(0.5, 2))}}
            for e, a in enumerate(acc, 1)]


def _trial(store, tid, params, epochs=4, peak=0.9, state="COMPLETED", reason="trained", history=True):
    stage = tid.rsplit("-", 1)[0]
    store.write_spec({"experiment": store.experiment, "trial_id": tid, "stage": stage, "params": params})
    records = _history(epochs, peak, params["solver.lr"]) if history else []
    if records:
        store.write_history(tid, records)
        best = max(records, key=lambda r: r["val_acc"])
        store.write_checkpoint(tid, best["epoch"], best["val_acc"], {"w": np.zeros(2, np.float32)}, keep=2)
    if state is not None:
        record_result(store, tid, {"trial_id": tid, "state": state, "reason": reason,
                                 "best_val_acc": round(best["val_acc"], 4) if records else 0.0,
                                 "best_epoch": best["epoch"] if records else 0, "epochs_done": len(records),
                                 "worker": "w1", "seconds": 2.0, "finished_at": 0.0, "checkpoint": None})


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two stages, every trial state, a border flag, an ensemble, and corrupt / partial / foreign files."""
    s = ExperimentStore(tmp_path_factory.mktemp("report") / "storage", "exp").ensure()
    record_experiment(s, {"stages": {"coarse": {"epochs": 4, "trials": 8}, "medium": {"epochs": 6, "trials": 3}},
                          "space": SPACE})
    record_stage(s, "coarse", [], ranges={"solver.lr": SPACE["solver"]["lr"],
                                          "model.dropout": SPACE["model"]["dropout"]},
                 flags=({"name": "solver.lr", "side": "upper", "best": 0.09, "low": 1e-4, "high": 0.1,
                         "new_low": 1e-3, "new_high": 0.4},),
                 flag_messages=("solver.lr: best 9.0e-02 at the upper border of [1e-04, 1e-01] -> "
                                "widen to [1e-03, 4e-01]",))
    record_stage(s, "medium", [], ranges={"solver.lr": {"dist": "loguniform", "low": 1e-3, "high": 0.4}},
                 flags=({"parameter": "solver.lr"},))  # foreign: skipped with a warning
    rng = np.random.default_rng(0)
    for i in range(6):
        lr = float(10 ** rng.uniform(-4, -1))
        _trial(s, f"coarse-{i:04d}", {"solver.lr": lr, "model.dropout": float(rng.uniform(0, 0.5)),
                                      "model.hidden": [32 * (1 + i % 2)]}, peak=0.6 + 0.05 * i)
    _trial(s, "coarse-0006", {"solver.lr": 0.5, "model.dropout": 0.1, "model.hidden": [32]}, history=False,
           state="DIVERGED", reason="nan loss at epoch 1")
    _trial(s, "coarse-0007", {"solver.lr": 0.01, "model.dropout": 0.1, "model.hidden": [32]}, history=False,
           state="FAILED", reason="MemoryError: ")
    _trial(s, "medium-0000", {"solver.lr": 0.05, "model.dropout": 0.2, "model.hidden": [64]}, epochs=6, peak=0.97)
    _trial(s, "medium-0001", {"solver.lr": 0.2, "model.dropout": 0.3, "model.hidden": [64]}, epochs=2, peak=0.5,
           state="KILLED", reason="below rung median at epoch 2")
    _trial(s, "medium-0002", {"solver.lr": 0.02, "model.dropout": 0.3, "model.hidden": [32]}, state="RUNNING")
    _trial(s, "medium-0003", {"solver.lr": 0.03, "model.dropout": 0.3, "model.hidden": [32]}, history=False,
           state="QUEUED")
    # corrupt, partial and foreign files
    (s.trial_dir("coarse-0005") / "val0.9990_ep009.npz").write_bytes(b"\x00garbage")
    (s.trial_dir("coarse-0004") / "val0.5000_ep002.npz.tmp").write_bytes(b"PK\x03")
    (s.trial_dir("coarse-0003") / "result.json").write_text('{"state": "COMPL')
    with open(s.trial_dir("coarse-0002") / "history.jsonl", "a") as f:
        f.write('{"epoch": 5, "val_')
    (s.trials_dir / "scratch").mkdir()
    (s.trials_dir / "README.txt").write_text("not a trial")
    s.ensembles_dir.mkdir()
    (s.ensembles_dir / "junk.json").write_text("[1, 2]")
    (s.ensembles_dir / "top2-average.json").write_text(json.dumps({
        "name": "top2-average", "method": "average", "ema": False, "trials": ["medium-0000", "coarse-0005"],
        "best_single": "medium-0000", "members": [{"trial": "medium-0000", "weight": 0.5},
                                                  {"trial": "coarse-0005", "weight": 0.5}],
        "scores": {"val": {"ensemble": 0.975, "best_single": 0.97, "gain": 0.005},
                   "test": {"ensemble": 0.962, "best_single": 0.95, "gain": 0.012}}}))
    return s


@pytest.fixture(scope="module")
def built(store):
    """(report, warnings logged while building it); built once for the tests that only read it."""
    collect = _Collect()
    root = logging.getLogger()
    root.addHandler(collect)
    try:
        return build_report(store), "\n".join(collect.messages)
    finally:
        root.removeHandler(collect)


def test_files_columns_and_sort_order_with_warnings_naming_skipped_files(store, built):
    report, warnings = built
    for path in (report.html, report.csv, report.json):
        assert path.parent == store.report_dir and path.stat().st_size > 0
    with open(report.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    params = ["model.dropout", "model.hidden", "solver.lr"]
    columns = BASE_COLUMNS[:BASE_COLUMNS.index("train_acc") + 1] + ["gap"] \
        + BASE_COLUMNS[BASE_COLUMNS.index("train_acc") + 1:] + params
    assert list(rows[0]) == columns
    assert len(rows) == 12 and rows[0]["trial"] == "medium-0000"
    accs = [float(r["val_acc"]) for r in rows if r["val_acc"]]
    assert accs == sorted(accs, reverse=True) and len(accs) == 11
    assert [r["trial"] for r in rows[-3:]] == ["coarse-0006", "coarse-0007", "medium-0003"]  # 0.0, 0.0, none
    assert rows[-1]["val_acc"] == "" and float(rows[-2]["val_acc"]) == 0.0
    by_trial = {r["trial"]: r for r in rows}
    best = by_trial["medium-0000"]
    assert float(best["gap"]) == pytest.approx(float(best["train_acc"]) - float(best["val_acc"]))
    assert json.loads(by_trial["medium-0000"]["model.hidden"]) == [64]
    assert by_trial["medium-0002"]["state"] == "RUNNING" and by_trial["medium-0003"]["state"] == "QUEUED"
    assert by_trial["coarse-0003"]["state"] == "UNREADABLE"  # its result.json is corrupt: its state is unknown
    assert by_trial["medium-0001"]["reason"] == "below rung median at epoch 2"
    records = json.loads(report.json.read_text())
    assert [r["trial"] for r in records] == [r["trial"] for r in rows]
    for skipped in (store.trial_dir("coarse-0003") / "result.json", store.trial_dir("coarse-0002") / "history.jsonl",
                    store.trials_dir / "scratch", store.trials_dir / "README.txt", store.ensembles_dir / "junk.json",
                    store.stages_dir / "medium.json"):
        assert str(skipped) in warnings


def test_html_is_self_contained_and_references_every_plot(built):
    page = built[0].html.read_text()
    for plot in PLOTS:
        assert re.search(rf'<img id="{plot}-plot" alt="[^"]+" src="data:image/png;base64,[A-Za-z0-9+/=]+">', page)
    babysat = re.findall(r'<img id="babysit-([\w-]+)-(\w+)"', page)  # top 3: no loss trace, snapshot, first layer
    assert sorted(babysat) == sorted((t, f) for t in ("medium-0000", "coarse-0005", "medium-0002")
                                     for f in ("accuracy", "ratios"))
    assert page.count("<img ") == len(PLOTS) + len(babysat)
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing to fetch: opens from disk
    assert 'id="leaderboard"' in page and "medium-0000" in page and "below rung median" in page
    assert 'id="ensembles"' in page and "top2-average" in page and "+0.0120" in page
    assert "Flagged: coarse: solver.lr: best 9.0e-02 at the upper border" in page


def test_log_axes_where_sampled_log_uniformly_and_stage_order(store):
    from master.leaderboard import build_leaderboard

    df = build_leaderboard(store)
    ctx = read_context(store, df)
    assert numeric_params(df) == ["model.dropout", "solver.lr"]  # not model.hidden (lists), not derived columns
    assert ctx.stages == ["coarse", "medium"]
    assert ctx.log_scale("solver.lr") and not ctx.log_scale("model.dropout")
    fig = scatter_figure(df, ["model.dropout", "solver.lr"], ctx)
    dropout_ax, lr_ax = fig.axes[:2]
    assert dropout_ax.get_xscale() == "linear" and lr_ax.get_xscale() == "log"
    flagged = [line for line in lr_ax.get_lines() if line.get_linewidth() == 3 and line.get_xdata()[0] == 0.1]
    assert flagged, "the flagged upper border of solver.lr is drawn"


def test_an_empty_experiment_still_gets_a_page(tmp_path):
    store = ExperimentStore(tmp_path, "empty").ensure()
    page = build_report(store).html.read_text()
    assert "no trials yet" in page and "<img " not in page


@pytest.mark.slow
def test_page_renders_in_headless_chromium(built, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium); the page was not rendered")
    from matplotlib.image import imread

    html = built[0].html
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
           html.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), done.stderr[-2000:]
    pixels = imread(shot)
    assert pixels.shape[:2] == (2000, 1280)
    # every image decoded with a size, each choice parameter's strip plot among them (the DOM after load)
    probe = tmp_path / "probe.html"
    probe.write_text(html.read_text().replace("</body>", "<script>window.onload = () => document.querySelectorAll("
                     "'img').forEach(i => i.setAttribute('data-w', i.naturalWidth));</script></body>"))
    dom = subprocess.run([*cmd[:-3], "--dump-dom", "--virtual-time-budget=5000", probe.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    widths = dict(re.findall(r'<img id="([\w-]+)-plot"[^>]*data-w="(\d+)"', dom))
    assert set(widths) == set(PLOTS) and all(int(w) > 100 for w in widths.values()), widths
    assert pixels[..., :3].std() > 0.05  # not a blank page
    rows = pixels[..., :3].std(axis=(1, 2))
    assert (rows > 0.01).mean() > 0.5  # content over most of the height, not one line
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def test_cli_report_needs_no_redis(store, monkeypatch):
    from click.testing import CliRunner

    from master.cli import main

    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # unreachable, and never asked
    done = CliRunner().invoke(main, ["report", "--storage", str(store.root), "--experiment", "exp", "--top", "3",
                                     "--curves", "2"])
    assert done.exit_code == 0, done.output
    assert "medium-0000" in done.output and str(store.report_dir / "index.html") in done.output
    assert "learning curves of the top 2 runs" in (store.report_dir / "index.html").read_text().lower()
    done = CliRunner().invoke(main, ["report", "--storage", str(store.root), "--experiment", "nope"])
    assert done.exit_code == 2 and "experiment nope: not found" in done.output


def test_ratio_figure_leaves_a_gap_for_a_none_ratio():
    """A layer whose all-zero weights moved has update_ratio None in its history (no finite ratio)."""
    from master.report import ratio_figure

    history = [{"epoch": e, "update_ratio": {"layer1": None, "layer2": 0.3 / e}} for e in (1, 2, 3)]
    fig = ratio_figure({"coarse-0000": history})
    lines = {line.get_label(): line for line in fig.axes[0].get_lines() if line.get_label().startswith("layer")}
    assert set(lines) == {"layer1", "layer2"}
    assert np.isnan(lines["layer1"].get_ydata().astype(float)).all()
    assert list(lines["layer2"].get_ydata()) == pytest.approx([0.3, 0.15, 0.1])


def test_the_curves_show_sub_epoch_validation_scores_as_dots():
    plain = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "train_acc": 0.5, "val_acc": 0.4} for e in (1, 2)]
    pointed = [{**plain[0], "val_points": [[0.5, 0.3], [1.0, 0.42]]}, plain[1]]
    fig = curves_figure({"coarse-0000": plain, "coarse-0001": pointed})
    acc_ax = fig.axes[1]
    dots = [line for line in acc_ax.get_lines() if line.get_marker() == "o"]
    assert len(dots) == 1 and list(dots[0].get_xdata()) == [0.5, 1.0] and list(dots[0].get_ydata()) == [0.3, 0.42]
    assert dots[0].get_color() == acc_ax.get_lines()[2].get_color()  # the colour of coarse-0001's lines
    assert "dots: val subset within epochs" in acc_ax.get_title()
    plain_fig = curves_figure({"coarse-0000": plain})
    assert all(line.get_marker() != "o" for line in plain_fig.axes[1].get_lines())
    assert "dots" not in plain_fig.axes[1].get_title()
