"""Tests for master.dispatch on fakeredis: idempotent JSON jobs, force re-runs, timeouts, state views, URLs."""
import json
import threading
import zlib

import fakeredis
import pytest
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.serializers import JSONSerializer

from master.dispatch import RESULT_TTL_SECONDS, DispatchError, Dispatcher, connect, job_id, mask_url, trial_of
from master.monitor import enqueue
from worker.control import progress_key, request_stop, stop_key
from worker.jobs import TrialWorker
from worker.spec import SpecError, TrialSpec
from worker.store import ExperimentStore
from conftest import record_result

QUEUE = "hs-test"


pytestmark = pytest.mark.usefixtures("keep_signal_handlers")


@pytest.fixture
def conn():
    return fakeredis.FakeRedis()


def make_spec(trial_id="coarse-0001", epochs=1, experiment="exp"):
    return TrialSpec(experiment=experiment, trial_id=trial_id, stage="coarse", dataset="digits",
                     model={"hidden": [16]}, solver={"lr": 0.01}, epochs=epochs, seed=0)


def specs(n, **kw):
    return [make_spec(f"coarse-{i:04d}", **kw) for i in range(n)]


def work(conn):
    TrialWorker([QUEUE], connection=conn, name="w1").work(burst=True)


@pytest.mark.parametrize("experiment, trial", [
    ("exp", "coarse-0001"), ("my.exp", "a_b"), ("x__d", "a_.b"), ("u.d_", "q"), ("A-1", "fine-0042"),
])
def test_job_ids_are_valid_for_rq_and_one_to_one(experiment, trial):
    jid = job_id(experiment, trial)
    Job(jid, connection=fakeredis.FakeRedis())  # rq refuses ids outside [A-Za-z0-9_-]
    assert trial_of(jid) == (experiment, trial)
    assert job_id("exp", "coarse-0042") == "hs_exp__coarse-0042"
    assert trial_of("some-other-job") is None


def test_job_ids_refuse_unsafe_names():
    with pytest.raises(SpecError, match="experiment"):
        job_id("../x", "t1")


def test_enqueue_twice_enqueues_nothing_the_second_time(conn):
    d = Dispatcher(conn, QUEUE)
    assert d.enqueue(specs(5)) == [f"coarse-{i:04d}" for i in range(5)]
    assert d.enqueue(specs(5)) == []
    assert d.enqueue(specs(7)) == ["coarse-0005", "coarse-0006"]
    assert Queue(QUEUE, connection=conn).count == 7
    assert d.counts("exp") == {"queued": 7, "started": 0, "finished": 0, "failed": 0, "stopped": 0}


def test_the_job_carries_the_spec_as_json_with_timeout_and_result_ttl(conn):
    d = Dispatcher(conn, QUEUE)
    spec = make_spec(epochs=3)
    d.enqueue([spec])
    raw = conn.hgetall(Job.key_for(job_id("exp", "coarse-0001")))
    func, instance, args, kwargs = json.loads(zlib.decompress(raw[b"data"]))
    assert (func, instance, args, kwargs) == ("worker.jobs.train_trial", None, [spec.to_dict()], {})
    assert int(raw[b"timeout"]) == d.job_timeout(spec) == 300 + 3 * 600
    assert int(raw[b"result_ttl"]) == RESULT_TTL_SECONDS == 7 * 24 * 3600  # storage is the record
    assert raw[b"description"] == b"trial exp/coarse-0001"
    assert not any(v.startswith(b"\x80") for v in raw.values())  # no pickle anywhere


def test_timeouts_grow_with_the_epoch_budget(conn):
    d = Dispatcher(conn, QUEUE, seconds_per_epoch=10)
    assert d.job_timeout(make_spec(epochs=1)) < d.job_timeout(make_spec(epochs=50)) == 300 + 500


def test_force_reruns_finished_trials_but_never_duplicates_queued_ones(conn, storage):
    d = Dispatcher(conn, QUEUE)
    store = ExperimentStore(storage, "exp")
    enqueue(store, d, specs(2))
    assert enqueue(store, d, specs(2), force=True) == []  # still queued: not twice in the queue
    assert Queue(QUEUE, connection=conn).count == 2
    work(conn)
    assert store.read_result("coarse-0000").state == "COMPLETED"
    assert enqueue(store, d, specs(2)) == []
    assert enqueue(store, d, specs(2), force=True) == ["coarse-0000", "coarse-0001"]
    assert store.read_result("coarse-0000").state == "QUEUED"  # re-running: not terminal any more
    assert d.counts("exp") == {"queued": 2, "started": 0, "finished": 0, "failed": 0, "stopped": 0}
    job = Job.fetch(job_id("exp", "coarse-0000"), connection=conn, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.QUEUED and job.worker_name is None
    work(conn)
    assert store.read_result("coarse-0000").state == "COMPLETED"


def test_a_terminal_result_on_storage_is_not_enqueued_again_even_without_its_job(conn, storage):
    store = ExperimentStore(storage, "exp").ensure()
    store.write_spec(make_spec().to_dict())
    record_result(store, "coarse-0001", {"state": "KILLED", "reason": "stopped by user"})
    d = Dispatcher(conn, QUEUE)
    assert enqueue(store, d, [make_spec()]) == []
    assert enqueue(store, d, [make_spec()], force=True) == ["coarse-0001"]


def test_enqueue_marks_trials_queued_and_drops_old_stop_requests(conn):
    d = Dispatcher(conn, QUEUE)
    request_stop(conn, "exp", "coarse-0001", "old request")
    d.enqueue([make_spec(epochs=4)])
    assert conn.get(stop_key("exp", "coarse-0001")) is None
    progress = d.progress("exp")["coarse-0001"]
    assert (progress["state"], progress["epochs"]) == ("QUEUED", 4)


def test_request_stop_reaches_the_trial(conn, storage):
    d = Dispatcher(conn, QUEUE)
    d.enqueue([make_spec(epochs=3)])
    d.request_stop("exp", "coarse-0001", "stopped by user")
    assert conn.get(stop_key("exp", "coarse-0001")) == b"stopped by user"
    work(conn)
    result = ExperimentStore(storage, "exp").read_result("coarse-0001")
    assert result.state == "KILLED" and result.reason == "stopped by user"
    assert d.progress("exp")["coarse-0001"]["state"] == "KILLED"


def test_counts_are_per_experiment_and_see_failures(conn, storage):
    d = Dispatcher(conn, QUEUE)
    d.enqueue(specs(2) + [make_spec("coarse-0000", experiment="exp2")])
    Queue(QUEUE, connection=conn, serializer=JSONSerializer).enqueue("os.system", "true")
    work(conn)
    assert d.counts("exp") == {"queued": 0, "started": 0, "finished": 2, "failed": 0, "stopped": 0}
    assert d.counts("exp2")["finished"] == 1
    conn.hset(Job.key_for(job_id("exp", "coarse-0000")), "status", "stopped")  # as the failed registry holds it
    conn.zadd(Queue(QUEUE, connection=conn).failed_job_registry.key, {job_id("exp", "coarse-0000"): 2**40})
    assert d.counts("exp")["stopped"] == 1


def test_workers_lists_live_workers_with_their_heartbeat(conn):
    worker = TrialWorker([QUEUE], connection=conn, name="node1.42")
    worker.register_birth()
    worker.set_state("idle")
    listed = Dispatcher(conn, QUEUE).workers()
    assert [w["name"] for w in listed] == ["node1.42"]
    assert listed[0]["state"] == "idle" and listed[0]["current_job"] is None and listed[0]["last_heartbeat"] > 0
    worker.register_death()
    assert Dispatcher(conn, QUEUE).workers() == []


@pytest.mark.parametrize("url", ["redis://:hunter2@127.0.0.1:1/0", "rediss://admin:hunter2@127.0.0.1:1/0"])
def test_connect_errors_mask_the_password(url):
    with pytest.raises(DispatchError) as err:
        connect(url)
    assert "hunter2" not in str(err.value) and mask_url(url) in str(err.value)


def test_connect_uses_redis_url_from_the_environment(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://:hunter2@127.0.0.1:1/5")
    with pytest.raises(DispatchError, match=r"redis://:\*\*\*@127\.0\.0\.1:1/5"):
        connect(None)


def test_key_names_follow_the_contract():
    assert progress_key("exp", "coarse-0001") == "hs:exp:progress:coarse-0001"
    assert stop_key("exp", "coarse-0001") == "hs:exp:stop:coarse-0001"


def test_concurrent_enqueues_of_the_same_trials_enqueue_each_once(conn):
    got = []
    threads = [threading.Thread(target=lambda: got.extend(Dispatcher(conn, QUEUE).enqueue(specs(50))))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == [f"coarse-{i:04d}" for i in range(50)]
    assert Queue(QUEUE, connection=conn).count == 50
