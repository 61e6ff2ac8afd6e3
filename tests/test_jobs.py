"""Tests for the RQ side of the worker, in-process on fakeredis: allow-list, no unpickling, stops, timeouts."""
import os
import pickle
import signal
import sys
import threading
import time
import zlib

import fakeredis
import pytest
import redis
from rq import Callback
from rq.command import send_stop_job_command
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.serializers import JSONSerializer

from master.dispatch import Dispatcher, job_id
from master.monitor import requeue
from worker.control import read_progress, request_stop
from worker.jobs import INTERRUPT, STOP_COMMAND_REASON, TrialWorker, refusal, train_trial
from worker.spec import TrialSpec
from worker.store import ExperimentStore

from conftest import wait_for

QUEUE = "hs-test"


def stubborn_job():
    """Ignores stop requests, the way a trial stuck outside its minibatch loop would."""
    with INTERRUPT.running():
        while True:
            time.sleep(0.01)


def sleepy_job(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.01)
    return "slept"


def name_of(func):
    return f"{func.__module__}.{func.__name__}"


pytestmark = pytest.mark.usefixtures("keep_signal_handlers")


@pytest.fixture
def conn():
    return fakeredis.FakeRedis()


def make_spec(trial_id="coarse-0001", epochs=2, **overrides):
    fields = dict(experiment="exp", trial_id=trial_id, stage="coarse", dataset="digits", model={"hidden": [32]},
                  solver={"update": "adam", "lr": 1e-3, "batch_size": 64}, epochs=epochs, seed=1)
    fields.update(overrides)
    return TrialSpec(**fields)


def run_worker(conn, **kwargs):
    worker = TrialWorker([QUEUE], connection=conn, name=kwargs.pop("name", "w1"), **kwargs)
    worker.work(burst=True)
    worker.refresh()  # job counts live in Redis
    return worker


def fetch(conn, jid):
    return Job.fetch(jid, connection=conn, serializer=JSONSerializer)


def in_background(target):
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


# -- the job function -------------------------------------------------------------------------------------------

def test_trials_run_in_process_and_return_their_result(conn, storage):
    specs = [make_spec(f"coarse-000{i}", seed=i) for i in range(3)]
    assert Dispatcher(conn, QUEUE).enqueue(specs) == [s.trial_id for s in specs]
    worker = run_worker(conn)
    assert worker.successful_job_count == 3
    store = ExperimentStore(storage, "exp")
    for spec in specs:
        job = fetch(conn, job_id("exp", spec.trial_id))
        assert job.get_status() == JobStatus.FINISHED
        assert job.return_value() == store.read_result(spec.trial_id).to_dict()
        assert job.return_value()["state"] == "COMPLETED" and job.return_value()["worker"] == "w1"
    assert {t: p["state"] for t, p in read_progress(conn, "exp").items()} == {s.trial_id: "COMPLETED" for s in specs}


def test_redis_lost_while_rq_records_a_jobs_end_does_not_end_the_worker(conn, storage, monkeypatch, caplog):
    specs = [make_spec(f"coarse-000{i}", seed=i, epochs=1) for i in range(2)]
    Dispatcher(conn, QUEUE).enqueue(specs)
    ended = []

    def redis_gone_for_the_first_job(self, job, *args, **kwargs):  # Redis restarting as that job ends
        ended.append(job.id)
        if job.id == job_id("exp", specs[0].trial_id):
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        return original(self, job, *args, **kwargs)

    original = TrialWorker.handle_execution_ended
    monkeypatch.setattr(TrialWorker, "handle_execution_ended", redis_gone_for_the_first_job)
    worker = run_worker(conn)  # burst: returns once the queue is empty, instead of raising
    assert ended[-1] == job_id("exp", specs[1].trial_id)  # the worker went on to the second trial
    assert "could not record its end in Redis" in caplog.text
    store = ExperimentStore(storage, "exp")
    assert [store.read_result(s.trial_id).state for s in specs] == ["COMPLETED", "COMPLETED"]
    assert worker.successful_job_count == 1


def test_an_invalid_spec_fails_the_job_with_the_field_named(conn, storage):
    job = Queue(QUEUE, connection=conn, serializer=JSONSerializer).enqueue(
        "worker.jobs.train_trial", {**make_spec().to_dict(), "epochs": 0})
    run_worker(conn)
    assert fetch(conn, job.id).get_status() == JobStatus.FAILED
    assert "epochs: expected an integer >= 1" in fetch(conn, job.id).latest_result().exc_string


def test_train_trial_outside_a_worker_says_so():
    with pytest.raises(RuntimeError, match="inside an RQ worker"):
        train_trial(make_spec().to_dict())


# -- the allow-list and the serializer ----------------------------------------------------------------------------

@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """A module whose import leaves a marker file: proves whether the worker imported it."""
    (tmp_path / "evil_mod.py").write_text(
        f"open({str(tmp_path / 'imported')!r}, 'w').close()\n"
        "def run(*args, **kwargs):\n    return 'ran'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path / "imported"
    sys.modules.pop("evil_mod", None)


def test_a_function_off_the_allow_list_is_refused_with_a_reason(conn, storage, tmp_path):
    marker = tmp_path / "pwned"
    job = Queue(QUEUE, connection=conn, serializer=JSONSerializer).enqueue("os.system", f"touch {marker}")
    worker = run_worker(conn)
    job = fetch(conn, job.id)
    assert job.get_status() == JobStatus.FAILED
    assert job.latest_result().exc_string == "refused: 'os.system' is not an allowed job function"
    assert not marker.exists() and worker.failed_job_count == 1


def test_refusal_happens_before_the_function_is_imported(conn, storage, evil_module):
    job = Queue(QUEUE, connection=conn, serializer=JSONSerializer).enqueue("evil_mod.run")
    run_worker(conn)
    assert fetch(conn, job.id).latest_result().exc_string == "refused: 'evil_mod.run' is not an allowed job function"
    assert not evil_module.exists() and "evil_mod" not in sys.modules


def test_a_callback_off_the_allow_list_is_refused_too(conn, storage, evil_module):
    job = Queue(QUEUE, connection=conn, serializer=JSONSerializer).enqueue(
        "worker.jobs.train_trial", make_spec().to_dict(), on_failure=Callback("evil_mod.run"))
    run_worker(conn)
    assert fetch(conn, job.id).latest_result().exc_string == "refused: 'evil_mod.run' is not an allowed job function"
    assert not evil_module.exists()


def test_a_pickled_payload_is_never_unpickled(conn, storage, tmp_path):
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    job = Queue(QUEUE, connection=conn, serializer=JSONSerializer).enqueue("worker.jobs.train_trial", {})
    conn.hset(job.key, "data", zlib.compress(pickle.dumps(("worker.jobs.train_trial", None, [Payload()], {}))))
    worker = run_worker(conn)
    job = fetch(conn, job.id)
    assert job.get_status() == JobStatus.FAILED
    assert job.latest_result().exc_string.startswith("refused: the job's data is not a JSON job payload")
    assert not marker.exists() and worker.failed_job_count == 1


def test_refusal_reads_only_the_payload():
    conn = fakeredis.FakeRedis()
    ok = Job.create("worker.jobs.train_trial", args=({},), connection=conn, serializer=JSONSerializer)
    assert refusal(ok) is None
    bad = Job.create("builtins.eval", args=("1",), connection=conn, serializer=JSONSerializer)
    assert refusal(bad) == "refused: 'builtins.eval' is not an allowed job function"
    assert refusal(ok, allowed=frozenset()) == "refused: 'worker.jobs.train_trial' is not an allowed job function"


def test_the_worker_only_speaks_json(conn):
    with pytest.raises(ValueError, match="only speaks JSON"):
        TrialWorker([QUEUE], connection=conn, serializer="rq.serializers.DefaultSerializer")


# -- stopping a running trial ---------------------------------------------------------------------------------------

def start_long_trial(conn, storage):
    spec = make_spec(epochs=5000, model={"hidden": [64]})
    Dispatcher(conn, QUEUE).enqueue([spec])
    return spec, ExperimentStore(storage, "exp")


def test_a_stop_key_is_honoured_within_a_second(conn, storage):
    spec, store = start_long_trial(conn, storage)
    asked = {}

    def stop_after_first_epoch():
        wait_for(lambda: read_progress(conn, "exp").get(spec.trial_id, {}).get("epoch", 0) >= 1, interval=0.005)
        asked["at"] = time.time()
        request_stop(conn, "exp", spec.trial_id, "stopped by user")

    in_background(stop_after_first_epoch)
    run_worker(conn)
    result = store.read_result(spec.trial_id)
    assert result.state == "KILLED" and result.reason == "stopped by user"
    assert result.finished_at - asked["at"] < 1.0
    assert 1 <= result.epochs_done < spec.epochs
    assert fetch(conn, job_id("exp", spec.trial_id)).get_status() == JobStatus.FINISHED


def test_rq_stop_job_command_stops_an_in_process_trial(conn, storage):
    spec, store = start_long_trial(conn, storage)
    jid = job_id("exp", spec.trial_id)
    asked = {}

    def send_stop():
        wait_for(lambda: read_progress(conn, "exp").get(spec.trial_id, {}).get("epoch", 0) >= 1, interval=0.005)
        asked["at"] = time.time()
        send_stop_job_command(conn, jid, serializer=JSONSerializer)

    in_background(send_stop)
    run_worker(conn)
    result = store.read_result(spec.trial_id)
    assert result.state == "KILLED" and result.reason == STOP_COMMAND_REASON
    assert result.finished_at - asked["at"] < 1.0
    job = fetch(conn, jid)
    assert job.get_status() == JobStatus.STOPPED  # as with RQ's forking worker
    assert jid in Queue(QUEUE, connection=conn).failed_job_registry.get_job_ids()


def test_a_job_that_ignores_the_stop_command_is_interrupted(conn, storage):
    queue = Queue(QUEUE, connection=conn, serializer=JSONSerializer)
    job = queue.enqueue(name_of(stubborn_job))
    took = {}

    def send_stop():
        wait_for(lambda: fetch(conn, job.id).get_status() == JobStatus.STARTED, interval=0.005)
        took["asked"] = time.monotonic()
        send_stop_job_command(conn, job.id, serializer=JSONSerializer)

    in_background(send_stop)
    run_worker(conn, allowed=frozenset({name_of(stubborn_job)}), stop_grace=0.5)
    took["done"] = time.monotonic()
    job = fetch(conn, job.id)
    assert job.get_status() == JobStatus.STOPPED
    assert "StopJob" in job.latest_result().exc_string
    assert 0.4 < took["done"] - took["asked"] < 3.0


def test_a_trial_requeued_while_it_runs_ends_without_a_result_and_leaves_the_job_to_its_new_run(conn, storage,
                                                                                                caplog):
    spec, store = start_long_trial(conn, storage)
    jid = job_id("exp", spec.trial_id)
    seen = {}

    def requeue_after_first_epoch():  # what the master does when it stops hearing from the worker
        wait_for(lambda: read_progress(conn, "exp").get(spec.trial_id, {}).get("epoch", 0) >= 1, interval=0.005)
        requeue(store, Dispatcher(conn, QUEUE), spec, "worker w1 lost heartbeat", "requeue")
        seen["epoch"] = store.latest_checkpoint(spec.trial_id).epoch

    in_background(requeue_after_first_epoch)
    worker = TrialWorker([QUEUE], connection=conn, name="w1")
    worker.work(burst=True, max_jobs=1)
    worker.refresh()
    assert f"trial {spec.trial_id}: no longer this worker's (its job is now queued" in caplog.text
    assert store.read_result(spec.trial_id).state == "QUEUED"  # the new run writes the outcome
    assert store.latest_checkpoint(spec.trial_id).epoch <= seen["epoch"] + 1  # at most the epoch being confirmed
    assert fetch(conn, jid).get_status() == JobStatus.QUEUED and jid in Queue(QUEUE, connection=conn).job_ids
    assert worker.successful_job_count == worker.failed_job_count == 0
    assert not Queue(QUEUE, connection=conn).started_job_registry.get_job_ids()


def test_the_job_timeout_still_works_in_process(conn, storage):
    job = Queue(QUEUE, connection=conn, serializer=JSONSerializer).enqueue(name_of(sleepy_job), 30, job_timeout=1)
    started = time.monotonic()
    run_worker(conn, allowed=frozenset({name_of(sleepy_job)}))
    assert time.monotonic() - started < 5
    job = fetch(conn, job.id)
    assert job.get_status() == JobStatus.FAILED
    assert "JobTimeoutException" in job.latest_result().exc_string


def test_a_trial_past_its_timeout_is_recorded_failed(conn, storage):
    spec = make_spec(epochs=5000)
    dispatcher = Dispatcher(conn, QUEUE)
    dispatcher.job_timeout = lambda s: 1
    dispatcher.enqueue([spec])
    run_worker(conn)
    result = ExperimentStore(storage, "exp").read_result(spec.trial_id)
    assert result.state == "FAILED" and "JobTimeoutException" in result.reason
    assert fetch(conn, job_id("exp", spec.trial_id)).get_status() == JobStatus.FAILED


def test_heartbeats_continue_while_a_job_runs(conn, storage):
    job = Queue(QUEUE, connection=conn, serializer=JSONSerializer).enqueue(name_of(sleepy_job), 2.5)
    beats = set()

    def sample():
        wait_for(lambda: fetch(conn, job.id).get_status() == JobStatus.STARTED, interval=0.005)
        while fetch(conn, job.id).get_status() == JobStatus.STARTED:
            beats.add(conn.hget("rq:worker:w1", "last_heartbeat"))
            time.sleep(0.05)

    sampler = in_background(sample)
    run_worker(conn, allowed=frozenset({name_of(sleepy_job)}), job_monitoring_interval=1)
    sampler.join(5)
    assert fetch(conn, job.id).return_value() == "slept"
    assert len(beats) >= 3  # the start plus at least two beats during the 2.5 s job


def test_worker_heartbeats_are_batched_but_never_leave_a_short_ttl(conn):
    worker = TrialWorker([QUEUE], connection=conn, name="hb")
    worker.register_birth()
    worker.heartbeat()
    assert conn.ttl(worker.key) > 400  # RQ's full worker TTL
    with conn.pipeline() as pipe:  # as when a job starts: a short TTL, renewed by the heartbeat thread
        worker.heartbeat(70, pipeline=pipe)
        pipe.execute()
    assert conn.ttl(worker.key) <= 70
    worker.heartbeat()  # right after the job: not skipped, the short TTL is replaced
    assert conn.ttl(worker.key) > 400
    beat = conn.hget(worker.key, "last_heartbeat")
    worker.heartbeat()  # within a second of a full-TTL beat: skipped (RQ sends three around every job)
    assert conn.hget(worker.key, "last_heartbeat") == beat
    time.sleep(1.05)
    worker.heartbeat()
    assert conn.hget(worker.key, "last_heartbeat") != beat
    worker.register_death()


def test_a_failed_heartbeat_is_retried_within_a_second(conn, storage, monkeypatch):
    job = Queue(QUEUE, connection=conn, serializer=JSONSerializer).enqueue(name_of(sleepy_job), 3.6)
    calls = []
    real = TrialWorker.maintain_heartbeats

    def flaky(self, job, execution):
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise redis.ConnectionError("Redis is restarting")
        return real(self, job, execution)

    monkeypatch.setattr(TrialWorker, "maintain_heartbeats", flaky)
    run_worker(conn, allowed=frozenset({name_of(sleepy_job)}), job_monitoring_interval=2)
    assert fetch(conn, job.id).return_value() == "slept"
    assert len(calls) >= 2 and 0.8 < calls[1] - calls[0] < 1.8  # not a whole 2 s interval later


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_worker_registers_ends_it_before_any_job(conn, signum):
    """RQ makes the worker visible before installing its signal handlers; a supervisor's SIGTERM (or the
    shutdown command's SIGINT) in between must end the worker cleanly, not kill it or be lost."""
    seen = []
    signal.signal(signum, lambda *_: seen.append("the process's own handler"))  # where the signal would go
    Queue(QUEUE, connection=conn, serializer=JSONSerializer).enqueue("worker.jobs.train_trial",
                                                                     make_spec().to_dict(), job_id="j1")
    worker = TrialWorker([QUEUE], connection=conn, name="early")
    registered = worker.register_birth

    def register_then_signal(*args, **kwargs):
        registered(*args, **kwargs)
        os.kill(os.getpid(), signum)

    worker.register_birth = register_then_signal
    assert worker.work(burst=True) is False  # stopped before taking the queued job
    assert worker.stop_asked and seen == []
    assert fetch(conn, "j1").get_status() == JobStatus.QUEUED
