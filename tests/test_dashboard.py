"""The dashboard's JSON endpoints and actions through Flask's test client, its incremental reads, and `master serve`'s
errors; the real browser against a running search is tests/test_dashboard_browser.py."""
import json
import os
import shutil
import socket
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from master import dashboard
from master.cli import main
from master.dashboard import Dashboard, LiveStore, create_app
from worker.states import TrialState
from worker.store import ExperimentStore

from conftest import record_experiment, record_result, record_stage

TOKEN = "s3cret-token"
SPACE = {"solver": {"lr": {"dist": "loguniform", "low": 1e-4, "high": 1e-1}},
         "model": {"hidden": {"dist": "choice", "values": [[16], [32]]}}}
CONFIG_TEXT = """\
[experiment]
name = "dash"
dataset = "digits"
[stages.coarse]
epochs = 3
trials = 4
[stages.fine]
epochs = 6
trials = 2
method = "narrow"
[space.solver]
lr = { dist = "loguniform", low = 1e-4, high = 1e-1 }
[space.model]
hidden = { dist = "choice", values = [[16], [32]] }
"""


def epoch(e, acc, **more):
    return {"epoch": e, "val_acc": acc, "train_acc": acc + 0.01, "train_loss": 1.0 / e, "val_loss": 1.1 / e,
            "lr": 1e-3, "seconds": 0.1, "update_ratio": {"layer1": 1e-3}, **more}


@pytest.fixture
def store(tmp_path):
    """An experiment "dash": coarse-0000..0002 finished (0.9, 0.8, killed 0.5), coarse-0003 running two epochs in,
    with a loss trace and a babysitting record."""
    store = ExperimentStore(tmp_path, "dash").ensure()
    record_experiment(store, {"space": SPACE, "stages": {"coarse": {"epochs": 3}}}, CONFIG_TEXT)
    ids = [f"coarse-{i:04d}" for i in range(4)]
    record_stage(store, "coarse", ids)
    for i, (tid, acc, state) in enumerate(zip(ids, (0.9, 0.8, 0.5, None), ("COMPLETED", "COMPLETED", "KILLED",
                                                                            "RUNNING"))):
        store.write_spec({"experiment": "dash", "trial_id": tid, "stage": "coarse",
                          "params": {"solver.lr": 10.0 ** -(i + 1), "model.hidden": [16 * (1 + i % 2)]}})
        if state == "RUNNING":
            store.write_history(tid, [epoch(1, 0.4, loss_trace=[[0, 2.3], [5, 1.9]]),
                                      epoch(2, 0.6, babysit={"activations": {"layer1": {"mean": 0.5, "std": 1.0,
                                                                                        "dead_fraction": 0.1}}})])
            store.transition(tid, TrialState.RUNNING, "running on w1", "started", worker="w1")
            store.write_checkpoint(tid, 2, 0.6, {"w": __import__("numpy").zeros(2)}, keep=2)
            continue
        store.write_history(tid, [epoch(1, acc / 2), epoch(2, acc)])
        record_result(store, tid, {"state": state, "reason": "stopped by user" if state == "KILLED" else "done",
                                   "best_val_acc": acc, "best_epoch": 2, "epochs_done": 2, "worker": "w1"})
    return store


def client(store, token=None, experiment="dash"):
    return create_app(Dashboard(store.root, experiment, None, "default"), token).test_client()


@pytest.fixture(autouse=True)
def no_redis(monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)


def test_state_has_counts_funnel_workers_leaderboard_and_curves(store):
    s = client(store).get("/api/e/dash/state").get_json()
    assert (s["total"], s["finished"], s["connected"]) == (4, 3, False)
    assert s["funnel"] == [{"stage": "coarse", "status": "launched", "total": 4,
                            "counts": {"COMPLETED": 2, "KILLED": 1, "RUNNING": 1}}]
    assert [r["trial"] for r in s["leaderboard"]["rows"]] == ["coarse-0000", "coarse-0001", "coarse-0003",
                                                              "coarse-0002"]
    assert s["leaderboard"]["rows"][2]["val_acc"] == 0.6  # a running trial ranks by its epochs so far
    assert s["params"] == ["model.hidden", "solver.lr"] and s["stages"] == ["coarse", "fine"]
    assert s["workers"] == [{"name": "w1", "alive": None, "state": "busy", "trial": "coarse-0003", "experiment": "dash",
                             "last_heartbeat": s["workers"][0]["last_heartbeat"], "source": "storage",
                             "quarantined": False}]
    curves = {c["trial"]: c for c in s["curves"]}
    assert curves["coarse-0003"]["running"] and curves["coarse-0003"]["val_acc"] == [0.4, 0.6]
    assert not curves["coarse-0000"]["running"] and curves["coarse-0000"]["epoch"] == [1, 2]
    assert s["next_stage"] == "fine" and s["ensembles"] == []


def test_the_leaderboard_sorts_filters_and_cuts(store):
    c = client(store)
    rows = lambda q: [r["trial"] for r in c.get(f"/api/e/dash/state?{q}").get_json()["leaderboard"]["rows"]]  # noqa
    assert rows("sort=val_acc&order=asc") == ["coarse-0002", "coarse-0003", "coarse-0001", "coarse-0000"]
    assert rows("sort=solver.lr&order=desc") == ["coarse-0000", "coarse-0001", "coarse-0002", "coarse-0003"]
    assert rows("state=KILLED") == ["coarse-0002"]
    assert rows("stage=fine") == []
    assert rows("limit=2") == ["coarse-0000", "coarse-0001"]
    bad = c.get("/api/e/dash/state?limit=many")
    assert bad.status_code == 400 and "limit" in bad.get_json()["error"]


def test_scatter_marks_log_and_categorical_parameters(store):
    d = client(store).get("/api/e/dash/scatter").get_json()
    params = {p["name"]: p for p in d["params"]}
    assert params["solver.lr"]["log"] and not params["solver.lr"]["categorical"]
    assert params["model.hidden"]["categorical"] and set(params["model.hidden"]["values"]) == {"[16]", "[32]"}
    assert len(d["val_acc"]) == len(d["trial"]) == 4


def test_trial_page_has_spec_events_history_babysitting_and_checkpoints(store):
    c = client(store)
    t = c.get("/api/e/dash/trials/coarse-0003").get_json()
    assert t["spec"]["params"]["solver.lr"] == 1e-4 and t["result"]["state"] == "RUNNING"
    assert [e["event"] for e in t["events"]] == ["started"]
    assert [h["epoch"] for h in t["history"]] == [1, 2] and "loss_trace" not in t["history"][0]
    assert t["loss_trace"] == [[0, 2.3], [5, 1.9]]
    assert t["babysit"] == [{"epoch": 2, "activations": {"layer1": {"mean": 0.5, "std": 1.0, "dead_fraction": 0.1}}}]
    assert [(k["file"], k["epoch"]) for k in t["checkpoints"]] == [("val0.6000_ep002.npz", 2)]
    assert c.get("/api/e/dash/trials/coarse-0099").status_code == 404
    assert c.get("/api/e/other/state").status_code == 404


def test_pages_and_assets_are_served_locally(store):
    c = client(store)
    page = c.get("/e/dash/trials/coarse-0000").get_data(as_text=True)
    assert "/static/dashboard.js" in page and "http" not in page.replace("http-equiv", "")
    for asset in ("dashboard.js", "charts.js", "dashboard.css"):
        assert c.get(f"/static/{asset}").status_code == 200
    assert c.get("/").headers["Location"].endswith("/e/dash")


def test_actions_need_allow_actions_and_the_token(store):
    kill = "/api/e/dash/trials/coarse-0003/kill"
    refused = client(store).post(kill, headers={dashboard.TOKEN_HEADER: TOKEN})
    assert refused.status_code == 403 and "--allow-actions" in refused.get_json()["error"]
    c = client(store, TOKEN)
    assert c.post(kill).status_code == 403
    assert c.post(kill, headers={dashboard.TOKEN_HEADER: "guess"}).status_code == 403
    assert c.post("/api/e/dash/stages/fine/launch").status_code == 403
    # with the token it is tried: no Redis here, so the kill is refused with the reason, not with 403
    tried = c.post(kill, headers={dashboard.TOKEN_HEADER: TOKEN})
    assert tried.status_code == 409 and "no Redis" in tried.get_json()["error"]
    launched = c.post("/api/e/dash/stages/fine/launch", headers={dashboard.TOKEN_HEADER: TOKEN})
    assert launched.status_code == 409 and "--url" in launched.get_json()["error"]
    assert client(store, TOKEN).get("/api/config").get_json()["actions"] is True
    assert store.read_result("coarse-0003").state.value == "RUNNING"


def test_every_experiment_of_the_root_is_listed(store, tmp_path):
    other = ExperimentStore(tmp_path, "other").ensure()
    record_experiment(other)
    listed = {e["name"]: e for e in client(store, experiment=None).get("/api/experiments").get_json()}
    assert set(listed) == {"dash", "other"}
    assert (listed["dash"]["trials"], listed["dash"]["finished"], listed["dash"]["best"]) == (4, 3, 0.9)


def age(store, seconds=60):
    """Set every file and folder of the experiment's trials back ``seconds`` (older than the racy window)."""
    for folder, _, files in os.walk(store.trials_dir):
        for path in [folder, *(os.path.join(folder, f) for f in files)]:
            st = os.stat(path)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - seconds * 10**9))


def test_a_refresh_reads_again_only_what_changed(store, monkeypatch):
    reads = Counter()
    for name in ("read_spec", "read_result", "read_history"):
        original = getattr(ExperimentStore, name)
        monkeypatch.setattr(ExperimentStore, name,
                            lambda self, tid, _o=original, _n=name: reads.update([(_n, tid)]) or _o(self, tid))
    age(store)
    c = client(store)
    c.get("/api/e/dash/state")
    assert reads[("read_history", "coarse-0000")] == 1 and reads[("read_result", "coarse-0003")] == 1
    reads.clear()
    c.get("/api/e/dash/state")
    assert reads == Counter()  # nothing changed: no file opened
    store.append_history("coarse-0003", epoch(3, 0.7))
    s = c.get("/api/e/dash/state").get_json()
    assert reads == Counter({("read_history", "coarse-0003"): 1})
    assert {r["trial"]: r["epochs"] for r in s["leaderboard"]["rows"]}["coarse-0003"] == 3
    reads.clear()
    record_result(store, "coarse-0003", {"state": "COMPLETED", "best_val_acc": 0.7, "best_epoch": 3,
                                         "epochs_done": 3})
    s = c.get("/api/e/dash/state").get_json()
    assert set(reads) <= {("read_result", "coarse-0003"), ("read_history", "coarse-0003"),
                          ("read_spec", "coarse-0003")} and ("read_result", "coarse-0003") in reads
    assert s["finished"] == 4


def test_a_file_changed_within_the_racy_window_is_read_again(store):
    live = LiveStore(store.root, "dash")
    live.refresh()
    assert live.folder_sig("coarse-0000") is None  # written just now: not trusted
    age(store)
    live.refresh()
    assert live.folder_sig("coarse-0000") is not None


def test_serve_refuses_bad_input_with_one_line(store, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["serve", "--storage", str(store.root), "--experiment", "nope"])
    assert result.exit_code == 2 and "experiment nope: not found" in result.output
    result = runner.invoke(main, ["serve", "--storage", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "missing: not a directory" in result.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = runner.invoke(main, ["serve", "--storage", str(store.root), "--port", str(taken.getsockname()[1])])
    assert result.exit_code == 2 and "cannot listen there" in result.output


def test_a_new_trial_shows_at_once_and_a_finished_one_queued_again_at_the_next_full_look(store, monkeypatch):
    age(store)
    c = client(store)
    assert c.get("/api/e/dash/state").get_json()["total"] == 4
    store.write_spec({"experiment": "dash", "trial_id": "coarse-0004", "stage": "coarse", "params": {}})
    assert c.get("/api/e/dash/state").get_json()["total"] == 5  # the trials folder changed: listed again
    age(store)
    c.get("/api/e/dash/state")
    store.transition("coarse-0000", TrialState.QUEUED, "retry", "queued")
    state = lambda: {r["trial"]: r["state"] for r in c.get("/api/e/dash/state").get_json()["leaderboard"]["rows"]}  # noqa
    monkeypatch.setattr(dashboard, "FULL_SCAN_SECONDS", 0.0)
    assert state()["coarse-0000"] == "QUEUED"


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the chart script")
def test_linear_axis_ticks_are_round_numbers_inside_the_axis():
    script = (Path(dashboard.__file__).parent / "static" / "charts.js").read_text()
    probe = ("console.log(JSON.stringify([[0.13, 30.87], [0.902, 0.972], [-0.0291, 1.03], [0.0185, 0.5]]"
             ".map(d => ticks(d, false, 4))))")
    out = subprocess.run(["node", "-e", script + "\n" + probe], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [[10, 20, 30], [0.92, 0.94, 0.96], [0, 0.2, 0.4, 0.6, 0.8, 1],
                               [0.1, 0.2, 0.3, 0.4, 0.5]]


def test_a_promoted_run_is_one_curve_from_its_first_epoch(store):
    store.write_spec({"experiment": "dash", "trial_id": "fine-0000", "stage": "fine", "parent": "coarse-0000",
                      "params": {"solver.lr": 0.1, "model.hidden": [16]}})
    store.write_history("fine-0000", [epoch(3, 0.92), epoch(4, 0.95)])
    record_result(store, "fine-0000", {"state": "COMPLETED", "reason": "done", "best_val_acc": 0.95,
                                       "best_epoch": 4, "epochs_done": 4, "worker": "w1"})
    curves = {c["trial"]: c for c in client(store).get("/api/e/dash/state").get_json()["curves"]}
    assert "coarse-0000" not in curves  # its curve is the start of fine-0000's run, not a second one
    assert curves["fine-0000"]["epoch"] == [1, 2, 3, 4] and curves["fine-0000"]["val_acc"] == [0.45, 0.9, 0.92, 0.95]
