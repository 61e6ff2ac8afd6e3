"""End to end, as a user runs it: `master launch` in real subprocesses, the files and leaderboard it leaves,
Ctrl-C and SIGKILL leaving no process behind, and a URL launch served by real `worker start` processes."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from worker.store import ExperimentStore

from conftest import ever_started, outcome, wait_for

pytestmark = pytest.mark.slow


def master_command() -> list[str]:
    """The README's `master` console script, or the same CLI through the interpreter when it is not on PATH."""
    found = shutil.which("master")
    return [found] if found else [sys.executable, "-m", "master.cli"]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "HYPERSEARCH_STORAGE")}
    env["COLUMNS"] = "200"  # a wide leaderboard: one line per trial
    return env


class Launch:
    """A `master launch` subprocess and every process it started, seen by polling its process tree."""

    def __init__(self, args: list, cwd: Path):
        self.proc = subprocess.Popen(master_command() + ["launch", *map(str, args)], cwd=cwd, env=clean_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.seen: dict[int, tuple[float, str]] = {}
        self._watch = threading.Thread(target=self._poll, daemon=True)
        self._watch.start()

    def _poll(self) -> None:
        while self.proc.poll() is None:
            try:
                for child in psutil.Process(self.proc.pid).children(recursive=True):
                    try:  # the command line is re-read: a child seen between fork and exec shows its parent's
                        created, cmdline = child.create_time(), " ".join(child.cmdline())
                    except psutil.Error:
                        continue
                    if cmdline or child.pid not in self.seen:
                        self.seen[child.pid] = (created, cmdline)
            except psutil.Error:
                pass
            time.sleep(0.02)

    def wait(self, timeout: float) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        self._watch.join()
        return self.proc.returncode, out, err

    def survivors(self, timeout: float = 10.0) -> list[str]:
        """Command lines of the processes it started that are still alive after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            alive = []
            for pid, (created, cmdline) in self.seen.items():
                try:
                    p = psutil.Process(pid)
                    if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(f"{pid}: {cmdline}")
                except psutil.NoSuchProcess:
                    pass
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)

    def kinds(self) -> set[str]:
        return {("redis" if "redis-server" in c else "worker" if "worker.cli" in c else c)
                for _, c in self.seen.values()}


def test_readme_first_command_runs_a_stage_and_leaves_nothing_behind(tmp_path):
    storage = tmp_path / "tmp"
    storage.mkdir()
    launch = Launch(["--stage", "coarse", "--trials", 4, "--workers", 2, "--storage", storage], cwd=tmp_path)
    rc, out, err = launch.wait(timeout=180)
    assert rc == 0, err
    assert launch.kinds() >= {"redis", "worker"}
    assert launch.survivors() == []

    store = ExperimentStore(storage, "digits-mlp")
    experiment = store.read_experiment()
    assert experiment.name == "digits-mlp" and experiment.seed == 0
    assert experiment.config["experiment"]["dataset"] == "digits" and experiment.code_version
    stage = store.read_stage("coarse")
    ids = [f"coarse-{i:04d}" for i in range(4)]
    assert list(stage.trial_ids) == ids and stage.status == "completed"
    assert store.trial_ids() == ids
    for tid in ids:
        files = {p.name for p in store.trial_dir(tid).iterdir()}
        assert {"spec.json", "history.jsonl", "result.json"} <= files
        assert len(store.checkpoints(tid)) == 1
        assert store.read_result(tid).state == "COMPLETED"
        assert len(store.read_history(tid)) == 1
    assert not (store.dir / "local" / "server.json").exists()

    assert "digits-mlp / coarse: top 4 of 4 trials" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("coarse-")]
    assert [r[0] for r in rows] == sorted(ids, key=lambda t: -store.read_result(t).best_val_acc)
    best = max(store.read_result(t).best_val_acc for t in ids)
    assert rows[0][1] == "COMPLETED" and rows[0][2] == f"{best:.4f}"
    assert "stage coarse completed" in out


def test_ctrl_c_stops_trials_workers_and_redis_and_the_same_command_resumes(tmp_path, write_config):
    storage = tmp_path / "store"
    storage.mkdir()
    config = write_config("interrupt", dataset="spiral", epochs=400, trials=4, prune="none")
    args = ["--config", config, "--workers", 2, "--storage", storage]
    launch = Launch(args, cwd=tmp_path)
    store = ExperimentStore(storage, "interrupt")
    wait_for(lambda: any(store.read_history(t) for t in store.trial_ids()), 60, "a trial to finish an epoch")
    started = time.monotonic()
    launch.proc.send_signal(signal.SIGINT)
    rc, out, err = launch.wait(timeout=60)
    assert rc == 130, err
    assert time.monotonic() - started < 20
    assert launch.survivors() == []
    assert "interrupted" in out and "the same command resumes the interrupted trials" in out
    assert store.read_stage("coarse").status == "interrupted"
    stopped = {t: store.read_result(t) for t in store.trial_ids() if ever_started(store, t)}
    assert stopped and all(r.state == "QUEUED" and r.reason == "interrupted by user (Ctrl-C)"
                           for r in stopped.values())  # unfinished, not killed
    assert all(store.read_events(t)[-1]["event"] == "interrupted" for t in stopped)
    assert any(r.epochs_done >= 1 for r in stopped.values())  # one had finished an epoch (waited for above)

    relaunched = time.time()
    rc, out, err = Launch(args, cwd=tmp_path).wait(timeout=180)
    assert rc == 0, err
    for tid in store.trial_ids():
        assert store.read_result(tid).state == "COMPLETED"
        history = store.read_history(tid)
        assert [r["epoch"] for r in history] == list(range(1, 401))
        if tid in stopped:  # resumed: the epochs done before Ctrl-C (none if stopped in its first) not trained again
            assert all(r["time"] < relaunched for r in history[:stopped[tid].epochs_done])


def test_sigkilled_master_leaves_nothing_and_a_relaunch_resumes(tmp_path, write_config):
    storage = tmp_path / "store"
    storage.mkdir()
    config = write_config("sigkill", epochs=30, trials=2, prune="none")
    args = ["--config", config, "--workers", 2, "--storage", storage]
    launch = Launch(args, cwd=tmp_path)
    store = ExperimentStore(storage, "sigkill")
    wait_for(lambda: any(store.checkpoints(t) for t in store.trial_ids()), 60, "a first checkpoint")
    wait_for(lambda: launch.kinds() >= {"redis", "worker"}, 10, "the process tree to be seen")
    launch.proc.send_signal(signal.SIGKILL)
    launch.wait(timeout=10)
    assert launch.survivors() == [], "redis-server or a worker outlived a SIGKILLed master"

    unfinished = [t for t in store.trial_ids() if not outcome(store, t)]
    assert unfinished, "the stage finished before the kill; make the trials longer"
    relaunch = Launch(args, cwd=tmp_path)
    rc, out, err = relaunch.wait(timeout=180)
    assert rc == 0, err
    assert relaunch.survivors() == []
    for tid in store.trial_ids():
        assert store.read_result(tid).state == "COMPLETED"
        assert [r["epoch"] for r in store.read_history(tid)] == list(range(1, 31))


@pytest.mark.redis
def test_url_launch_served_by_real_workers_then_enqueues_nothing_new(tmp_path, write_config, real_redis):
    url, token = real_redis
    storage = tmp_path / "shared"
    storage.mkdir()
    name, queue = f"e2e-{token}", f"q-{token}"
    args = ["--config", write_config(name, trials=4), "--url", url, "--queue", queue, "--storage", storage]

    rc, out, err = Launch(args, cwd=tmp_path).wait(timeout=60)
    assert rc == 0, err
    assert "enqueued 4 of 4 trials" in out
    rc, out, err = Launch(args, cwd=tmp_path).wait(timeout=60)
    assert rc == 0 and "enqueued 0 of 4 trials" in out  # jobs already queued

    workers = [subprocess.Popen([sys.executable, "-m", "worker.cli", "start", "--url", url, "--queue", queue,
                                 "--storage", str(storage), "--name", f"{token}-w{i}", "--burst"],
                                env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    for w in workers:
        _, werr = w.communicate(timeout=120)
        assert w.returncode == 0, werr

    store = ExperimentStore(storage, name)
    results = {t: store.read_result(t) for t in store.trial_ids()}
    assert len(results) == 4 and all(r.state == "COMPLETED" for r in results.values())
    assert {r.worker for r in results.values()} <= {f"{token}-w0", f"{token}-w1"}

    rc, out, err = Launch(args, cwd=tmp_path).wait(timeout=60)
    assert rc == 0 and "enqueued 0 of 4 trials" in out  # finished in storage
    rc, out, err = Launch([*args, "--wait"], cwd=tmp_path).wait(timeout=60)
    assert rc == 0 and "stage coarse completed" in out and f"{name} / coarse: top 4 of 4 trials" in out
    assert json.loads((store.dir / "stages" / "coarse.json").read_text())["status"] == "completed"


def test_next_stage_narrows_around_the_best_of_the_first(tmp_path, write_config):
    storage = tmp_path / "store"
    storage.mkdir()
    config = write_config("stages", epochs=1, trials=6)
    common = ["--config", config, "--workers", 2, "--storage", storage]
    for stage in ("coarse", "medium"):
        rc, out, err = Launch(["--stage", stage, *common], cwd=tmp_path).wait(timeout=180)
        assert rc == 0, err
    assert "ranges from the best" in out
    store = ExperimentStore(storage, "stages")
    medium = store.read_stage("medium")
    assert medium.from_stage == "coarse" and medium.status == "completed"
    assert list(medium.trial_ids) == ["medium-0000", "medium-0001"]
    assert set(medium.ranges) == set(store.read_stage("coarse").ranges) == {"solver.lr", "model.hidden"}
    for tid in medium.trial_ids:
        assert store.read_result(tid).state == "COMPLETED" and store.read_result(tid).epochs_done == 3
