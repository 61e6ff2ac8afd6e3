"""The master CLI over stages and control: refusals, ranges old -> new and flags, --all, kill, a master restarted."""
import json
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from master.embedded import terminate_trees
from master.cli import main
from master.config import parse_config
from worker.store import ExperimentStore

from conftest import REAL_REDIS_URL as URL, outcome, record_result, record_stage
CONFIG = """
[experiment]
name = "{name}"
dataset = "digits"

[model]
hidden = [16]

[solver]
update = "adam"
batch_size = 64

[stages.coarse]
epochs = {coarse}
trials = {trials}

[stages.medium]
epochs = 2
trials = {medium}
method = "narrow"
quantile = 0.25

[stages.fine]
epochs = 4
trials = 1
method = "promote"

[space.solver]
lr = {{ dist = "loguniform", low = 1e-6, high = 1e-1 }}

[space.model]
dropout = {{ dist = "uniform", low = 0.0, high = 0.5 }}
"""


@pytest.fixture
def run(monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("HYPERSEARCH_STORAGE", raising=False)
    runner = CliRunner()
    return lambda *args: runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def tag(real_redis):
    """A unique token; every Redis key naming it is deleted afterwards."""
    return real_redis[1]


@pytest.fixture
def procs():
    """Subprocesses that are always terminated (then killed) at the end."""
    started: list[subprocess.Popen] = []
    yield started
    terminate_trees([p.pid for p in started], grace=10)


def write_config(tmp_path, name, coarse=1, trials=10, medium=6):
    path = tmp_path / f"{name}.toml"
    path.write_text(CONFIG.format(name=name, coarse=coarse, trials=trials, medium=medium))
    return path


def synthetic_coarse(root, path, unfinished=0):
    """Coarse trials with results (accuracy rising with lr) but no training, recorded as launched."""
    config = parse_config(path.read_text())
    store = ExperimentStore(root, config.name).ensure()
    ids = []
    for i in range(20):
        params = {"solver.lr": 10 ** (-6 + 5 * (0.025 + 0.05 * i)), "model.dropout": (7 * i % 20) / 40}
        spec = config.trial_spec("coarse", i, i, params)
        store.write_spec(spec.to_dict())
        ids.append(spec.trial_id)
        if i >= unfinished:
            record_result(store, spec.trial_id, {"state": "COMPLETED", "reason": "", "best_val_acc": 0.5 + i / 50,
                                               "epochs_done": 1, "worker": "w", "finished_at": float(i)})
    record_stage(store, "coarse", ids, ranges={d.name: d.to_dict() for d in config.space})
    return store


def worker(procs, tmp_path, root, queue, name):
    log = open(tmp_path / f"{name}.log", "wb")
    procs.append(subprocess.Popen([sys.executable, "-m", "worker.cli", "start", "--url", URL, "--storage",
                                   str(root), "--queue", queue, "--name", name],
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    log.close()
    return procs[-1]


def test_a_later_stage_is_refused_while_the_one_before_is_unfinished(run, tmp_path):
    path = write_config(tmp_path, "refuse")
    synthetic_coarse(tmp_path / "s", path, unfinished=2)
    result = run("launch", "--config", path, "--storage", tmp_path / "s", "--stage", "medium")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip() == ("Error: stage medium: stage coarse before it is unfinished (18 COMPLETED, "
                                     "2 unfinished); wait for it (master watch) or use --force to plan from its "
                                     "finished trials")
    assert not (tmp_path / "s" / "refuse" / "stages" / "medium.json").exists()


@pytest.mark.redis
def test_a_narrowed_stage_prints_flags_and_ranges_and_launching_again_adds_nothing(run, tmp_path, tag):
    path = write_config(tmp_path, f"narrow-{tag}")
    store = synthetic_coarse(tmp_path / "s", path)
    args = ["launch", "--config", path, "--storage", tmp_path / "s", "--stage", "medium", "--url", URL,
            "--queue", f"q-{tag}", "--no-wait"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())  # as printed, whatever the terminal width
    assert ("border: solver.lr: best 7.5e-02 at the upper border of [1e-06, 1e-01] -> widen to [2.4e-03, 1e+00] "
            "ranges from the best 5 of 20 finished trials of stage coarse: "
            "solver.lr: [1e-06, 1e-01] -> [2.4e-03, 1e+00] "  # top 5 at positions 0.775..0.975, padded by 0.1
            "model.dropout: [0, 0.5] (kept: the evidence is weak)") in out
    assert "enqueued 6 of 6 trials of stage medium" in out
    where = f"--experiment narrow-{tag} --url {URL} --storage {tmp_path / 's'} --queue q-{tag}"
    assert f"status: master status {where} watch: master watch {where}" in out  # the queue the trials are on
    record = store.read_stage("medium")
    assert record.ranges["solver.lr"]["high"] == pytest.approx(1.0) and len(record.trial_ids) == 6

    record_result(store, "coarse-0000", {"state": "COMPLETED", "best_val_acc": 0.99})  # coarse changes afterwards
    again = run(*args)
    out = " ".join(again.stdout.split())
    assert again.exit_code == 0 and "resuming stage medium as first launched" in out
    assert "enqueued 0 of 6 trials" in out and len(store.read_stage("medium").trial_ids) == 6


@pytest.mark.slow
def test_launch_all_runs_every_stage_in_order(run, tmp_path):
    path = write_config(tmp_path, "all", trials=4, medium=2)
    (tmp_path / "s").mkdir()
    result = run("launch", "--config", path, "--storage", tmp_path / "s", "--all", "--workers", 2)
    assert result.exit_code == 0, result.output
    store = ExperimentStore(tmp_path / "s", "all")
    for stage, n in (("coarse", 4), ("medium", 2), ("fine", 1)):
        record = store.read_stage(stage)
        assert record.status == "completed" and len(record.trial_ids) == n and record.flags is not None
    fine = store.read_spec("fine-0000")
    assert fine["parent"] in store.read_stage("medium").trial_ids
    history = store.read_history("fine-0000")
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert history[:2] == store.read_history(fine["parent"])  # promoted: the parent's epochs are not retrained
    assert store.read_result("fine-0000").state == "COMPLETED"
    again = run("launch", "--config", path, "--storage", tmp_path / "s", "--all")
    assert again.exit_code == 0 and again.stdout.count("already completed") == 3


LONG = """
[experiment]
name = "{name}"
dataset = "digits"
[model]
hidden = [256]
[solver]
update = "adam"
lr = 0.003
batch_size = 16
[stages.coarse]
epochs = {epochs}
trials = {trials}
prune = "none"
"""


@pytest.mark.slow
@pytest.mark.redis
def test_kill_by_hand_keeps_checkpoints_and_the_reason_shows_in_status(run, tmp_path, tag, procs):
    path = tmp_path / "kill.toml"
    path.write_text(LONG.format(name=f"kill-{tag}", epochs=200, trials=1))
    root, queue = tmp_path / "s", f"q-{tag}"
    root.mkdir()
    common = ["--storage", root, "--url", URL, "--queue", queue]
    assert run("launch", "--config", path, *common, "--no-wait").exit_code == 0
    worker(procs, tmp_path, root, queue, f"w-{tag}")
    store = ExperimentStore(root, f"kill-{tag}")
    deadline = time.monotonic() + 60
    while len(store.read_history("coarse-0000")) < 2:
        assert time.monotonic() < deadline, "no two epochs within 60 s"
        time.sleep(0.1)
    result = run("kill", "coarse-0000", "--reason", "enough of this", "--experiment", f"kill-{tag}", *common)
    assert result.exit_code == 0, result.output
    assert "coarse-0000: KILLED (enough of this)" in result.stdout and "kept" in result.stdout
    assert store.read_result("coarse-0000").reason == "enough of this" and store.checkpoints("coarse-0000")
    status = run("status", "--experiment", f"kill-{tag}", *common)
    assert "KILLED" in status.stdout and "enough of this" in status.stdout
    refused = run("kill", "coarse-0000", "--experiment", f"kill-{tag}", *common)
    assert refused.exit_code == 2 and "already finished (KILLED)" in refused.stderr


@pytest.mark.slow
@pytest.mark.redis
def test_a_master_killed_mid_stage_is_launched_again_and_finishes_the_stage(tmp_path, tag, procs):
    path = tmp_path / "restart.toml"
    name = f"restart-{tag}"
    path.write_text(LONG.format(name=name, epochs=12, trials=4))
    root, queue = tmp_path / "s", f"q-{tag}"
    root.mkdir()
    command = [sys.executable, "-m", "master.cli", "launch", "--config", str(path), "--storage", str(root),
               "--url", URL, "--queue", queue, "--wait"]
    master = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs.append(master)
    worker(procs, tmp_path, root, queue, f"w-{tag}")
    store = ExperimentStore(root, name)
    deadline = time.monotonic() + 90
    while outcome(store, "coarse-0000") is None:
        assert time.monotonic() < deadline, "no trial finished within 90 s"
        time.sleep(0.05)
    master.send_signal(signal.SIGKILL)
    master.wait()
    unfinished = [t for t in store.trial_ids() if outcome(store, t) is None]
    assert unfinished  # killed mid-stage

    again = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "enqueued 0 of 4 trials" in again.stdout and "stage coarse completed" in again.stdout
    assert store.trial_ids() == [f"coarse-{i:04d}" for i in range(4)]  # no trial duplicated
    for tid in store.trial_ids():
        assert store.read_result(tid).state == "COMPLETED"
        assert [r["epoch"] for r in store.read_history(tid)] == list(range(1, 13))  # none lost, none repeated
    assert json.loads((store.stages_dir / "coarse.json").read_text())["status"] == "completed"
