"""Tests for the Redis control plane: URL masking, connections, progress, stop requests, in-process interrupts."""
import threading
import time

import fakeredis
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker.control import (
    ControlError,
    JobInterrupt,
    RedisControl,
    StopJob,
    TrialLost,
    mask_url,
    open_redis,
    progress_key,
    read_progress,
    redis_url,
    request_stop,
    reset_trial,
    stop_key,
)


@pytest.fixture
def conn():
    return fakeredis.FakeRedis()


@pytest.mark.parametrize("url, masked", [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://:hunter2@db.example:6379/3", "redis://:***@db.example:6379/3"),
    ("redis://alice:hunter2@db.example:6379/0", "redis://alice:***@db.example:6379/0"),
    ("rediss://alice:p%40ss@db.example:6380/1", "rediss://alice:***@db.example:6380/1"),
    ("redis://db.example/0?password=hunter2&socket_timeout=5", "redis://db.example/0?password=***&socket_timeout=5"),
    ("unix:///run/redis.sock?db=2", "unix:///run/redis.sock?db=2"),
    ("redis://:hunt/er2@db.example:6379/0", "redis://:***@db.example:6379/0"),  # unencoded '/', '?', '#': still
    ("redis://bob:12?er2@db.example/0", "redis://bob:***@db.example/0"),      # hidden whole
    ("redis://bob:hun#ter@db.example/0", "redis://bob:***@db.example/0"),
])
def test_mask_url_hides_passwords(url, masked):
    assert mask_url(url) == masked


def test_redis_url_prefers_the_flag(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://env:6379/0")
    assert redis_url("redis://flag:6379/0") == "redis://flag:6379/0"
    assert redis_url(None) == "redis://env:6379/0"
    monkeypatch.delenv("REDIS_URL")
    assert redis_url(None) is None


@pytest.mark.parametrize("url", ["redis://:hunter2@127.0.0.1:1/0", "rediss://bob:hunter2@127.0.0.1:1/0",
                                 "redis://127.0.0.1:1/0?password=hunter2"])
def test_open_redis_failure_is_one_masked_line(url):
    with pytest.raises(ControlError) as err:
        open_redis(url)
    message = str(err.value)
    assert message.startswith("cannot reach Redis at ") and "***" in message
    assert "hunter2" not in message and "\n" not in message


@pytest.mark.parametrize("url", ["redis://:hun/ter2@127.0.0.1:1/0", "redis://bob:zq?hunter2@127.0.0.1/0",
                                 "redis://:hunter2#zq@127.0.0.1:1/0"])
def test_a_password_that_needs_percent_encoding_is_refused_without_showing_it(url):
    with pytest.raises(ControlError) as err:
        open_redis(url)
    assert str(err.value).startswith("cannot use Redis URL redis://") and "percent-encoded" in str(err.value)
    assert "hun" not in str(err.value) and "zq" not in str(err.value)


def test_open_redis_rejects_an_unknown_scheme():
    with pytest.raises(ControlError, match="cannot reach Redis at http://x:1/"):
        open_redis("http://x:1/")


def test_progress_round_trip_keeps_types(conn):
    RedisControl(conn, "exp", "coarse-0001", "w1").report({"state": "RUNNING", "epoch": 2, "val_acc": 0.5,
                                                            "reason": "3", "initial_loss": float("nan")})
    RedisControl(conn, "exp", "coarse-0002", "w2").report({"state": "KILLED"})
    RedisControl(conn, "other", "coarse-0001", "w3").report({"state": "RUNNING"})
    progress = read_progress(conn, "exp")
    assert sorted(progress) == ["coarse-0001", "coarse-0002"]
    first = progress["coarse-0001"]
    assert (first["state"], first["epoch"], first["val_acc"], first["reason"], first["worker"]) == \
        ("RUNNING", 2, 0.5, "3", "w1")
    assert first["initial_loss"] != first["initial_loss"]  # NaN survives
    assert abs(first["updated"] - time.time()) < 5
    assert conn.ttl(progress_key("exp", "coarse-0001")) > 0


def test_progress_written_by_something_else_is_read_as_text(conn):
    conn.hset(progress_key("exp", "t1"), mapping={"state": "RUNNING", "epoch": "3"})
    assert read_progress(conn, "exp") == {"t1": {"state": "RUNNING", "epoch": 3}}


def test_stop_request_is_seen_and_polls_are_throttled(conn):
    control = RedisControl(conn, "exp", "t1", "w1", poll_seconds=0.2)
    assert control.should_stop() is None
    request_stop(conn, "exp", "t1", "stopped by user")
    assert control.should_stop() is None  # within the poll interval: no Redis read
    time.sleep(0.25)
    assert control.should_stop() == "stopped by user"
    conn.delete(stop_key("exp", "t1"))
    assert control.should_stop() == "stopped by user"  # a stop, once seen, stays


def test_many_should_stop_calls_read_redis_rarely(conn):
    reads = []
    real_pipeline = conn.pipeline
    conn.pipeline = lambda **kwargs: reads.append(kwargs) or real_pipeline(**kwargs)
    control = RedisControl(conn, "exp", "t1", "w1", poll_seconds=0.2)
    end = time.monotonic() + 0.5
    calls = 0
    while time.monotonic() < end:
        control.should_stop()
        calls += 1
    assert calls > 1000 and 2 <= len(reads) <= 4


def test_a_trial_whose_job_is_no_longer_ours_is_lost(conn):
    conn.hset("rq:job:j1", mapping={"status": "started", "worker_name": "w1"})
    control = RedisControl(conn, "exp", "t1", "w1", poll_seconds=0, job_key="rq:job:j1")
    assert control.should_stop() is None
    control.confirm()
    for fields, problem in (({"worker_name": "w2"}, "its job is now started on worker w2"),
                            ({"status": "queued", "worker_name": ""}, "its job is now queued")):
        conn.hset("rq:job:j1", mapping=fields)
        for check in (control.should_stop, control.confirm):
            with pytest.raises(TrialLost, match=f"^trial t1: no longer this worker's \\({problem};"):
                check()
    conn.delete("rq:job:j1")
    with pytest.raises(TrialLost, match="its job is gone from Redis"):
        control.confirm()
    RedisControl(conn, "exp", "t1", "w1").confirm()  # no job to check: nothing to confirm


def test_confirm_waits_for_redis_and_asks_again_after_a_slow_answer(monkeypatch, caplog):
    monkeypatch.setattr("worker.control.CONFIRM_RETRY_SECONDS", 0.01)
    monkeypatch.setattr("worker.control.FRESH_REPLY_SECONDS", 0.05)
    answers = iter([redis.ConnectionError("Network is unreachable"), 0.1, 0.0])

    class Flaky:
        asked = 0

        def hmget(self, key, *fields):
            self.asked += 1
            answer = next(answers)
            if isinstance(answer, Exception):
                raise answer
            time.sleep(answer)  # a slow answer may predate a requeue: it is not trusted
            return [b"started", b"w1"]

    conn = Flaky()
    RedisControl(conn, "exp", "t1", "w1", job_key="rq:job:j1").confirm()
    assert conn.asked == 3 and "holding its writes until Redis answers" in caplog.text


def test_reset_trial_marks_queued_and_drops_old_stop(conn):
    request_stop(conn, "exp", "t1", "old")
    RedisControl(conn, "exp", "t1", "w1").report({"state": "KILLED", "reason": "old", "epoch": 4})
    reset_trial(conn, "exp", "t1", epochs=9)
    assert conn.get(stop_key("exp", "t1")) is None
    assert read_progress(conn, "exp")["t1"] | {"updated": 0} == {"state": "QUEUED", "epoch": 0, "epochs": 9,
                                                                 "updated": 0}


def test_redis_errors_in_the_control_plane_only_warn(caplog):
    gone = redis.Redis(host="127.0.0.1", port=1, retry=Retry(NoBackoff(), 0))
    control = RedisControl(gone, "exp", "t1", "w1")
    control.report({"state": "RUNNING"})
    assert control.should_stop() is None
    assert "cannot publish progress" in caplog.text and "cannot read the stop request" in caplog.text


def test_interrupt_reason_is_seen_without_redis(conn):
    interrupt = JobInterrupt()
    control = RedisControl(conn, "exp", "t1", "w1", interrupt=interrupt)
    assert control.should_stop() is None
    interrupt.request("stopped by user (RQ stop-job command)", grace=60)
    assert control.should_stop() == "stopped by user (RQ stop-job command)"
    interrupt.clear()


def test_interrupt_raises_stopjob_in_a_job_that_ignores_it():
    interrupt = JobInterrupt()
    outcome = {}

    def stubborn():
        with interrupt.running():
            try:
                while True:
                    time.sleep(0.005)
            except StopJob as exc:
                outcome["raised"] = (time.monotonic(), str(exc))

    thread = threading.Thread(target=stubborn)
    thread.start()
    time.sleep(0.05)
    asked = time.monotonic()
    interrupt.request("stop", grace=0.3)
    thread.join(5)
    assert not thread.is_alive()
    raised_at, message = outcome["raised"]
    assert 0.25 < raised_at - asked < 1.5
    assert "did not stop within the grace period" in message


def test_interrupt_does_nothing_once_the_job_has_returned():
    interrupt = JobInterrupt()
    with interrupt.running():
        interrupt.request("stop", grace=0.05)
    time.sleep(0.2)  # the timer was cancelled with the job; nothing may be raised here
    interrupt.request("late", grace=0.05)  # no job registered: the timer fires and finds no thread
    time.sleep(0.2)
    assert interrupt.reason == "stop"
    interrupt.clear()
    assert interrupt.reason is None
