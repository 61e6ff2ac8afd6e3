"""End-to-end tests of `worker start` processes against the real Redis on 127.0.0.1:6379 (and a TLS one)."""
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import uuid

import numpy as np
import pytest
import redis
from rq.command import send_stop_job_command
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from threadpoolctl import threadpool_limits

from master.embedded import terminate_trees
from master.dispatch import RESULT_TTL_SECONDS, Dispatcher, connect, job_id
from master.monitor import enqueue
from conftest import NullControl, outcome
from worker.spec import TrialSpec
from worker.store import ExperimentStore, load_npz
from worker.trainer import run_trial

from conftest import wait_for


def worker_command(url, storage, queue, name, *extra):
    return [sys.executable, "-m", "worker.cli", "start", "--url", url, "--storage", str(storage),
            "--queue", queue, "--name", name, *extra]


@pytest.fixture
def rq_redis(real_redis):
    """(url, client, tag) on the real Redis (conftest's real_redis deletes every key naming the tag and drops
    the tag's members of RQ's queue and worker sets)."""
    url, tag = real_redis
    conn = redis.Redis.from_url(url)
    yield url, conn, tag
    conn.close()


class Workers:
    """`worker start` subprocesses that are always terminated (then killed) at the end."""

    def __init__(self, tmp_path):
        self.tmp_path, self.procs = tmp_path, []

    def start(self, command):
        log = open(self.tmp_path / f"worker-{len(self.procs)}.log", "wb")
        self.procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        log.close()
        return self.procs[-1]

    def logs(self):
        return "".join(p.read_text() for p in sorted(self.tmp_path.glob("worker-*.log")))

    def stop(self):
        terminate_trees([p.pid for p in self.procs], grace=10)


@pytest.fixture
def workers(tmp_path):
    w = Workers(tmp_path)
    yield w
    w.stop()


def make_spec(experiment, index, epochs=1, hidden=(32,)):
    return TrialSpec(experiment=experiment, trial_id=f"coarse-{index:04d}", stage="coarse", dataset="digits",
                     model={"hidden": list(hidden)}, solver={"update": "adam", "lr": 3e-3, "batch_size": 64},
                     epochs=epochs, seed=index, data={"preprocess": "standardize"})


@pytest.mark.slow
@pytest.mark.redis
def test_two_workers_complete_eight_trials_with_consistent_records(rq_redis, workers, tmp_path):
    url, conn, tag = rq_redis
    experiment, queue, storage = f"it-{tag}", f"hs-it-{tag}", tmp_path / "storage"
    specs = [make_spec(experiment, i) for i in range(8)]
    dispatcher = Dispatcher(conn, queue)
    assert len(dispatcher.enqueue(specs)) == 8
    procs = [workers.start(worker_command(url, storage, queue, f"it-{tag}-{n}", "--burst")) for n in (1, 2)]
    for p in procs:
        assert p.wait(180) == 0, workers.logs()

    store = ExperimentStore(storage, experiment)
    for spec in specs:
        result = store.read_result(spec.trial_id)
        assert result.state == "COMPLETED", result
        assert result.worker in {f"it-{tag}-1", f"it-{tag}-2"}
        history = store.read_history(spec.trial_id)
        assert [r["epoch"] for r in history] == [1]
        (ckpt,) = store.checkpoints(spec.trial_id)
        assert ckpt.path.name == result.checkpoint
        assert ckpt.val_acc == round(history[0]["val_acc"], 4) == result.best_val_acc
        job = Job.fetch(job_id(experiment, spec.trial_id), connection=conn, serializer=JSONSerializer)
        assert job.get_status() == JobStatus.FINISHED and job.return_value() == result.to_dict()
        assert 0 < conn.ttl(job.key) <= RESULT_TTL_SECONDS  # Redis does not keep finished jobs for ever
    assert dispatcher.counts(experiment)["finished"] == 8
    assert enqueue(store, dispatcher, specs) == []  # launching again enqueues nothing
    assert Dispatcher(conn, queue).enqueue(specs) == []  # not even without storage, while the jobs live
    conn.delete(*[Job.key_for(job_id(experiment, s.trial_id)) for s in specs])  # as when their TTL ran out
    assert enqueue(store, dispatcher, specs) == []  # storage is the record


@pytest.mark.slow
@pytest.mark.redis
def test_stops_reach_trials_in_other_processes(rq_redis, workers, tmp_path):
    url, conn, tag = rq_redis
    experiment, queue, storage = f"it-{tag}", f"hs-it-{tag}", tmp_path / "storage"
    dispatcher = Dispatcher(conn, queue)
    by_key, by_command = make_spec(experiment, 0, epochs=5000), make_spec(experiment, 1, epochs=5000)
    dispatcher.enqueue([by_key, by_command])
    name = f"it-{tag}-1"
    proc = workers.start(worker_command(url, storage, queue, name, "--burst"))
    store = ExperimentStore(storage, experiment)

    def running(spec):
        return lambda: dispatcher.progress(experiment).get(spec.trial_id, {}).get("epoch", 0) >= 1

    wait_for(running(by_key), 60, "the first trial to run")
    asked = time.time()
    dispatcher.request_stop(experiment, by_key.trial_id, "stopped by user")
    wait_for(lambda: outcome(store, by_key.trial_id) is not None, 10, "the first trial to stop")
    result = store.read_result(by_key.trial_id)
    assert result.state == "KILLED" and result.reason == "stopped by user"
    assert result.finished_at - asked < 1.0

    wait_for(running(by_command), 60, "the second trial to run")
    assert [w["trial_id"] for w in dispatcher.workers() if w["name"] == name] == [by_command.trial_id]
    asked = time.time()
    send_stop_job_command(conn, job_id(experiment, by_command.trial_id), serializer=JSONSerializer)
    assert proc.wait(30) == 0, workers.logs()
    result = store.read_result(by_command.trial_id)
    assert result.state == "KILLED" and result.finished_at - asked < 1.0
    job = Job.fetch(job_id(experiment, by_command.trial_id), connection=conn, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.STOPPED
    assert dispatcher.counts(experiment) == {"queued": 0, "started": 0, "finished": 1, "failed": 0, "stopped": 1}


@pytest.mark.slow
@pytest.mark.redis
def test_sigterm_hands_the_running_trial_back_and_the_worker_exits_within_two_seconds(rq_redis, workers, tmp_path):
    # issue 16 changed this: a busy worker used to finish its trial first (a warm shutdown of minutes)
    url, conn, tag = rq_redis
    experiment, queue, storage = f"it-{tag}", f"hs-it-{tag}", tmp_path / "storage"
    dispatcher = Dispatcher(conn, queue)
    spec = make_spec(experiment, 0, epochs=60, hidden=(128,))
    dispatcher.enqueue([spec, make_spec(experiment, 1)])
    proc = workers.start(worker_command(url, storage, queue, f"it-{tag}-1"))  # not --burst
    wait_for(lambda: dispatcher.progress(experiment).get(spec.trial_id, {}).get("epoch", 0) >= 1, 60,
             "the trial to run")
    asked = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0, workers.logs()
    assert time.monotonic() - asked < 2.0
    store = ExperimentStore(storage, experiment)
    result = store.read_result(spec.trial_id)
    assert (result.state, result.reason) == ("QUEUED", f"worker it-{tag}-1 shutting down")  # handed back, not KILLED
    kept = store.latest_checkpoint(spec.trial_id).epoch
    assert 1 <= kept < spec.epochs
    assert store.read_result("coarse-0001") is None  # and no new one was started (never recorded RUNNING)
    assert dispatcher.counts(experiment)["queued"] == 2  # both jobs wait in the queue: no master needed

    assert workers.start(worker_command(url, storage, queue, f"it-{tag}-2", "--burst")).wait(120) == 0
    result = store.read_result(spec.trial_id)
    assert (result.state, result.epochs_done, result.worker) == ("COMPLETED", spec.epochs, f"it-{tag}-2")
    assert [r["epoch"] for r in store.read_history(spec.trial_id)] == list(range(1, spec.epochs + 1))
    assert [e["event"] for e in store.read_events(spec.trial_id)].count("finished") == 1


@pytest.mark.slow
@pytest.mark.redis
def test_a_killed_worker_loses_at_most_the_epoch_in_flight(rq_redis, workers, tmp_path):
    url, conn, tag = rq_redis
    experiment, queue, storage = f"it-{tag}", f"hs-it-{tag}", tmp_path / "storage"
    dispatcher = Dispatcher(conn, queue)
    spec = make_spec(experiment, 0, epochs=40, hidden=(128,))
    dispatcher.enqueue([spec])
    proc = workers.start(worker_command(url, storage, queue, f"it-{tag}-1"))
    wait_for(lambda: dispatcher.progress(experiment).get(spec.trial_id, {}).get("epoch", 0) >= 3, 60,
             "three epochs")
    proc.kill()
    proc.wait()
    killed_at = time.time()
    store = ExperimentStore(storage, experiment)
    saved = store.latest_checkpoint(spec.trial_id).epoch
    assert 3 <= saved < spec.epochs and outcome(store, spec.trial_id) is None

    job = Job.fetch(job_id(experiment, spec.trial_id), connection=conn, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.STARTED  # a dead worker's job stays STARTED: requeue it by hand
    job.delete()
    assert dispatcher.enqueue([spec]) == [spec.trial_id]
    assert workers.start(worker_command(url, storage, queue, f"it-{tag}-2", "--burst")).wait(120) == 0

    result = store.read_result(spec.trial_id)
    assert result.state == "COMPLETED" and result.epochs_done == spec.epochs
    history = store.read_history(spec.trial_id)
    assert [r["epoch"] for r in history] == list(range(1, spec.epochs + 1))
    assert all((r["time"] < killed_at) == (r["epoch"] <= saved) for r in history)  # only later epochs re-ran

    straight = ExperimentStore(tmp_path / "straight", experiment).ensure()
    with threadpool_limits(1):  # as the workers (--threads 1): a GEMM split over more threads may round otherwise
        run_trial(spec, straight, NullControl())
    a = load_npz(straight.latest_checkpoint(spec.trial_id).path)
    b = load_npz(store.latest_checkpoint(spec.trial_id).path)
    for key in (k for k in a if k.startswith(("param.", "ema.", "opt."))):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # resumed == uninterrupted


@pytest.mark.slow
@pytest.mark.redis
def test_a_password_url_works_and_the_password_is_never_logged(rq_redis, workers, tmp_path):
    url, conn, tag = rq_redis
    user, password = f"hs-it-{tag}", f"pw@:/?#%-{uuid.uuid4().hex}"  # percent-encoded in the URL, as documented
    encoded = urllib.parse.quote(password, safe="")
    conn.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"], channels=["*"],
                     commands=["+@all"])
    try:
        url = url.replace("redis://", f"redis://{user}:{encoded}@", 1)
        experiment, queue, storage = f"it-{tag}", f"hs-it-{tag}", tmp_path / "storage"
        assert Dispatcher(redis.Redis.from_url(url), queue).enqueue([make_spec(experiment, 0)]) == ["coarse-0000"]
        proc = workers.start(worker_command(url, storage, queue, f"it-{tag}-1", "--burst"))
        assert proc.wait(120) == 0, workers.logs()
        assert ExperimentStore(storage, experiment).read_result("coarse-0000").state == "COMPLETED"
        assert f"{user}:***@127.0.0.1" in workers.logs() and password not in workers.logs()
        assert encoded not in workers.logs()

        bad = workers.start(worker_command(url.replace(encoded, "wrong"), storage, queue, f"it-{tag}-2"))
        assert bad.wait(30) == 2
        assert "invalid username-password pair" in workers.logs()
    finally:
        conn.acl_deluser(user)


@pytest.mark.slow
def test_a_rediss_url_with_a_password_works_end_to_end(tls_redis, workers, tmp_path):
    url, password = tls_redis
    storage = tmp_path / "storage"
    assert Dispatcher(connect(url), "hypersearch").enqueue([make_spec("tls", 0)]) == ["coarse-0000"]
    proc = workers.start(worker_command(url, storage, "hypersearch", "tls-1", "--burst"))
    assert proc.wait(120) == 0, workers.logs()
    assert ExperimentStore(storage, "tls").read_result("coarse-0000").state == "COMPLETED"
    assert "rediss://:***@127.0.0.1" in workers.logs() and password not in workers.logs()


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_unreachable_redis_is_one_line_and_exit_2(tmp_path):
    done = run_cli("start", "--storage", str(tmp_path), "--burst", env={"REDIS_URL": "redis://:hunter2@127.0.0.1:1/0"})
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "worker: cannot reach Redis at redis://:***@127.0.0.1:1/0: Error 111 connecting to 127.0.0.1:1. "
        "Connection refused."]
    assert "hunter2" not in done.stdout + done.stderr


def test_unwritable_storage_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "file").write_text("")
    done = run_cli("start", "--url", "redis://127.0.0.1:1/0", "--storage", str(tmp_path / "file" / "sub"))
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(f"worker: storage {tmp_path}/file/sub:")


def test_exit_status_tells_a_supervisor_whether_to_restart(rq_redis, workers, tmp_path, monkeypatch):
    """A worker asked to quit (SIGTERM, or RQ's shutdown command as quarantine sends) exits 0; one whose
    RQ loop ended on its own (an unexpected error RQ logs and swallows) exits 1, so that systemd's
    Restart=on-failure or Kubernetes starts it again."""
    from click.testing import CliRunner
    from rq import Worker
    from rq.command import send_shutdown_command

    from worker import cli
    from worker.jobs import TrialWorker

    url, conn, tag = rq_redis
    for i, ask in enumerate(("sigterm", "shutdown")):
        name = f"{tag}-exit-{i}"
        proc = workers.start(worker_command(url, tmp_path, tag, name))
        wait_for(lambda: any(w.name == name for w in Worker.all(connection=conn)), 30, f"worker {name} registered")
        if ask == "sigterm":
            proc.send_signal(signal.SIGTERM)
        else:
            send_shutdown_command(conn, name)
        assert proc.wait(30) == 0, workers.logs()

    monkeypatch.setattr(TrialWorker, "work", lambda self, **kw: False)  # RQ's loop: "unhandled exception, quitting"
    done = CliRunner().invoke(cli.main, ["start", "--url", url, "--storage", str(tmp_path), "--queue", tag,
                                         "--name", f"{tag}-exit-2"])
    assert done.exit_code == 1
    assert f"{tag}-exit-2 quit on an unexpected error" in done.output
    burst = CliRunner().invoke(cli.main, ["start", "--url", url, "--storage", str(tmp_path), "--queue", tag,
                                          "--name", f"{tag}-exit-3", "--burst"])
    assert burst.exit_code == 0, burst.output  # --burst: returning is how it ends



@pytest.mark.redis
def test_quitting_never_waits_for_the_command_listener(rq_redis, keep_signal_handlers):
    """The race behind workers that took up to 60 s to quit: when the command listener reads the UNSUBSCRIBE
    reply before RQ clears its running flag, it blocks in get_message(timeout=sleep_time) on an unsubscribed
    connection, and redis-py 8.2's PubSubWorkerThread.stop() joins it. Forced here: the reply is read first."""
    from worker.jobs import TrialWorker

    url, conn, tag = rq_redis
    worker = TrialWorker([f"hs-{tag}"], connection=conn, name=f"{tag}-listener")
    worker.subscribe()
    wait_for(lambda: worker.pubsub.subscribed, 10, "the subscription")
    worker.pubsub.unsubscribe()
    wait_for(lambda: not worker.pubsub.subscribed, 10, "the listener to read the UNSUBSCRIBE reply")
    time.sleep(0.2)  # now blocked waiting for a subscription that never comes
    asked = time.monotonic()
    worker.unsubscribe()
    assert time.monotonic() - asked < 2.0
    assert not worker.pubsub_thread.is_alive()


@pytest.mark.slow
@pytest.mark.redis
def test_an_idle_worker_exits_within_two_seconds_of_sigterm_or_shutdown(rq_redis, workers, tmp_path):
    """RQ's unsubscribe() joins its command listener thread, which redis-py 8.2 lets block in a read of up to RQ's
    60 s: the worker listens with a short wake-up instead, so quitting never waits for it (ten times in a row)."""
    from rq import Worker
    from rq.command import send_shutdown_command

    url, conn, tag = rq_redis
    for i in range(10):
        name = f"{tag}-idle-{i}"
        proc = workers.start(worker_command(url, tmp_path, tag, name))
        wait_for(lambda: any(w.name == name for w in Worker.all(connection=conn)), 30, f"worker {name} registered")
        time.sleep(0.3)  # the listener thread is in its blocking read
        asked = time.monotonic()
        if i % 2:
            send_shutdown_command(conn, name)
        else:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, workers.logs()
        assert time.monotonic() - asked < 2.0, f"worker {name} took {time.monotonic() - asked:.1f} s to quit"
