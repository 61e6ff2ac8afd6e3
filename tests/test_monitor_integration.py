"""Real-Redis tests of the monitor with `worker start` processes: dead workers, divergence, quarantine, lost Redis."""
import subprocess
import sys
import threading
import time

import pytest
import redis
from click.testing import CliRunner

from master.cli import main
from master.dispatch import Dispatcher
from master.embedded import EmbeddedRedis, free_port, redis_server_binary, terminate_trees
from master.monitor import Monitor, watch
from master.config import parse_config
from master.stages import plan_stage
from worker.store import ExperimentStore

from conftest import REAL_REDIS_URL as URL, outcome, record_experiment, record_stage
from conftest import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.redis]


@pytest.fixture
def tag(real_redis):
    """A unique token; every Redis key naming it is deleted afterwards."""
    return real_redis[1]


class Experiment:
    """A config, its storage, a dispatcher and `worker start` processes (always reaped at the end)."""

    def __init__(self, tmp_path, tag, body, watch="heartbeat_seconds = 15\npoll_seconds = 0.3\nstop_grace = 5\n",
                 url=URL):
        self.tmp_path, self.name, self.queue = tmp_path, f"mon-{tag}", f"hs-mon-{tag}"
        text = f'[experiment]\nname = "{self.name}"\n{body}\n[watch]\n{watch}'
        self.config = parse_config(text)
        self.root = tmp_path / "storage"
        self.store = ExperimentStore(self.root, self.name).ensure()
        record_experiment(self.store, config_text=text)
        self.procs: list[subprocess.Popen] = []
        self.use(url)

    def use(self, url):
        """Talk to the Redis at ``url`` from now on (a fresh master: new dispatcher and monitor)."""
        self.url, self.conn = url, redis.Redis.from_url(url)
        self.dispatcher = Dispatcher(self.conn, self.queue)
        self.monitor = Monitor(self.store, self.config, self.dispatcher)

    def launch(self, stage="coarse"):
        specs = plan_stage(self.store, self.config, stage).specs
        for spec in specs:
            self.store.write_spec(spec.to_dict())
        record_stage(self.store, stage, [s.trial_id for s in specs])
        self.dispatcher.enqueue(specs)
        return specs

    def worker(self, name, cwd=None):
        log = open(self.tmp_path / f"{name}.log", "wb")
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "start", "--url", self.url, "--storage", str(self.root.resolve()),
             "--queue", self.queue, "--name", name], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL))
        log.close()
        return self.procs[-1]

    def watch(self, timeout):
        """Run the watch loop until the stage is done; fail after ``timeout`` seconds."""
        events, done = [], threading.Event()
        thread = threading.Thread(target=lambda: (watch(self.monitor, on_event=events.append), done.set()),
                                  daemon=True)
        thread.start()
        if not done.wait(timeout):
            raise AssertionError(f"stage not done within {timeout} s; events: {events}; logs: {self.logs()}")
        return events

    def logs(self):
        return "".join(p.read_text(errors="replace") for p in sorted(self.tmp_path.glob("*.log")))

    def stop(self):
        terminate_trees([p.pid for p in self.procs], grace=10)
        self.conn.close()


@pytest.fixture
def experiment(tmp_path, tag):
    made = []

    def make(*args, **kwargs):
        made.append(Experiment(tmp_path, tag, *args, **kwargs))
        return made[-1]
    yield make
    for e in made:
        e.stop()


LONG_TRIAL = """dataset = "digits"
[model]
hidden = [256]
[solver]
update = "adam"
lr = 0.003
batch_size = 32
[stages.coarse]
epochs = 40
trials = 1
prune = "none"
"""


def test_a_sigkilled_worker_loses_no_trial_it_resumes_elsewhere_from_its_checkpoint(experiment, tag):
    exp = experiment(LONG_TRIAL)
    (spec,) = exp.launch()
    tid = spec.trial_id
    first = exp.worker(f"a-{tag}")
    wait_for(lambda: exp.dispatcher.progress(exp.name).get(tid, {}).get("epoch", 0) >= 3, 60, "three epochs")
    exp.monitor.tick()  # the master has seen the worker's heartbeat
    first.kill()
    first.wait()
    killed_at = time.time()
    saved = exp.store.latest_checkpoint(tid).epoch
    exp.worker(f"b-{tag}")
    events = exp.watch(timeout=90)

    requeue = next(e for e in events if e.kind == "requeue")
    assert requeue.message.startswith(f"{tid}: worker a-{tag} lost heartbeat")
    (event,) = [e for e in exp.store.read_events(tid) if e["event"] not in ("queued", "started", "finished")]
    assert event["event"] == "requeue" and event["time"] - killed_at < 30  # noticed within 30 s
    result = exp.store.read_result(tid)
    assert (result.state, result.worker, result.epochs_done) == ("COMPLETED", f"b-{tag}", 40)
    history = exp.store.read_history(tid)
    assert [r["epoch"] for r in history] == list(range(1, 41))
    assert all((r["time"] < killed_at) == (r["epoch"] <= saved) for r in history)  # only the epoch in flight re-ran


def test_a_diverging_trial_is_stopped_with_its_reason(experiment, tag):
    exp = experiment("""dataset = "digits"
[model]
hidden = [64]
[solver]
update = "adam"
batch_size = 16
abort_factor = 1e9   # the worker's own abort would catch it first; here the master must
[stages.coarse]
epochs = 400
trials = 2
[space.solver]
lr = { dist = "loguniform", low = 1.0, high = 10.0 }
""")
    specs = exp.launch()
    exp.worker(f"a-{tag}")
    exp.worker(f"b-{tag}")
    events = exp.watch(timeout=90)
    for spec in specs:
        result = exp.store.read_result(spec.trial_id)
        assert result.state == "DIVERGED", result
        assert "exceeded 3x initial loss" in result.reason and 1 <= result.epochs_done < 400
        assert exp.store.checkpoints(spec.trial_id)  # killed trials keep their checkpoints
    assert sum(e.kind == "stop" for e in events) == 2


def test_a_worker_pointed_at_a_broken_dataset_is_quarantined_and_its_trials_retried(experiment, tag, tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    for d, rows in ((good, "".join(f"{i % 3},{i / 10},{(i * 7) % 5}\n" for i in range(90))), (bad, "garbage\n")):
        d.mkdir()
        (d / "data.csv").write_text("label,a,b\n" + rows)
    exp = experiment("""dataset = "csv:data.csv"
[model]
hidden = [8]
[stages.coarse]
epochs = 1
trials = 6
[space.solver]
lr = { dist = "loguniform", low = 1e-3, high = 1e-2 }
""", watch="fail_streak = 3\nmax_retries = 3\npoll_seconds = 0.2\n")
    specs = exp.launch()
    broken = exp.worker(f"bad-{tag}", cwd=bad)
    wait_for(lambda: sum(getattr(outcome(exp.store, s.trial_id), "state", None) == "FAILED" for s in specs) >= 3,
             60, "three failures")
    exp.worker(f"good-{tag}", cwd=good)
    events = exp.watch(timeout=90)
    assert broken.wait(20) == 0  # RQ's shutdown command: a clean exit
    quarantine = [e for e in events if e.kind == "quarantine"]
    assert quarantine and quarantine[0].message.startswith(f"worker bad-{tag} quarantined: its last 3 jobs failed")
    assert "DataError" in quarantine[0].message
    for spec in specs:
        result = exp.store.read_result(spec.trial_id)
        assert (result.state, result.worker) == ("COMPLETED", f"good-{tag}"), result
    status = CliRunner().invoke(main, ["status", "--experiment", exp.name, "--storage", str(exp.root), "--url", URL,
                                       "--queue", exp.queue], catch_exceptions=False)
    assert f"quarantined worker bad-{tag}: its last 3 jobs failed" in " ".join(status.stdout.split())
    decisions = {s.trial_id: [e for e in exp.store.read_events(s.trial_id)
                              if e["event"] not in ("queued", "started", "finished")] for s in specs}
    retried = [tid for tid, events in decisions.items() if events]
    # a retried job the quarantined worker took as it shut down never started: requeued after a grace
    stranded = "its job left the queue but never started (a worker stopped as it took it)"
    assert len(retried) >= 3 and all(e["event"] == "retry" or (e["event"], e["reason"]) == ("requeue", stranded)
                                     for tid in retried for e in decisions[tid])


def test_a_fresh_empty_redis_loses_no_result(experiment, tag, tmp_path):
    first = EmbeddedRedis(tmp_path / "redis-a")
    second = EmbeddedRedis(tmp_path / "redis-b")
    try:
        exp = experiment(LONG_TRIAL.replace("trials = 1", "trials = 4"), url=first.start())
        specs = exp.launch()
        crashed = exp.worker(f"a-{tag}")
        wait_for(lambda: outcome(exp.store, specs[0].trial_id) is not None, 90, "a first finished trial")
        crashed.kill()  # the whole cluster goes down: worker and Redis
        crashed.wait()
        first.stop()
        before = {s.trial_id: outcome(exp.store, s.trial_id) for s in specs}
        unfinished = {tid for tid, r in before.items() if r is None}
        assert unfinished and len(unfinished) < len(specs)

        exp.use(second.start())  # a fresh, empty Redis: only shared storage remembers the stage
        exp.worker(f"b-{tag}")
        events = exp.watch(timeout=120)
        assert {e.trial_id for e in events if e.kind == "requeue"} == unfinished
        for spec in specs:
            result = exp.store.read_result(spec.trial_id)
            assert result.state == "COMPLETED" and result.epochs_done == 40
            if before[spec.trial_id] is not None:
                assert result == before[spec.trial_id]  # finished before the crash: read back, not re-run
            assert [r["epoch"] for r in exp.store.read_history(spec.trial_id)] == list(range(1, 41))
    finally:
        first.stop()
        second.stop()


def test_a_redis_restart_with_persistence_mid_stage_loses_no_result(experiment, tag, tmp_path):
    port = free_port()
    args = [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(tmp_path),
            "--appendonly", "yes", "--save", ""]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: _answers(port), 10, "redis-server")
        exp = experiment(LONG_TRIAL.replace("trials = 1", "trials = 3"), url=f"redis://127.0.0.1:{port}/0")
        specs = exp.launch()
        exp.worker(f"a-{tag}")
        wait_for(lambda: len(exp.store.read_history(specs[0].trial_id)) >= 3, 60, "three epochs")
        server.terminate()  # mid-trial; the append-only file keeps the queue
        server.wait()
        server = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        wait_for(lambda: _answers(port), 10, "redis-server again")
        exp.worker(f"b-{tag}")  # the first worker may not survive its Redis going away
        exp.watch(timeout=120)
        for spec in specs:
            result = exp.store.read_result(spec.trial_id)
            assert result.state == "COMPLETED" and result.epochs_done == 40
            assert [r["epoch"] for r in exp.store.read_history(spec.trial_id)] == list(range(1, 41))
    finally:
        server.terminate()
        server.wait()


def _answers(port):
    try:
        return redis.Redis(port=port, socket_connect_timeout=0.2).ping()
    except redis.RedisError:
        return False
