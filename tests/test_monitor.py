"""Tests for the monitor on fakeredis without workers: quarantine rule, heartbeats, requeue, retries, stops, stages."""
import time

import fakeredis
import pytest
from rq.job import Job

from master.dispatch import Dispatcher, job_id, trial_of
from master.monitor import UNQUEUED_GRACE_SECONDS, WATCH_DUTY, Monitor, failing_workers, next_look, request_stop, watch, worker_outcomes
from master.config import parse_config
from master.stages import plan_stage
from worker.control import progress_key, read_progress, stop_key, stopped_as
from conftest import NullControl, record_result, record_stage
from worker.states import TrialState
from worker.store import ExperimentStore
from worker.trainer import run_trial

CONFIG = """
[experiment]
name = "mon"
dataset = "digits"

[model]
hidden = [16]

[stages.coarse]
epochs = 2
trials = 3

[space.solver]
lr = { dist = "loguniform", low = 1e-3, high = 1e-2 }

[watch]
heartbeat_seconds = 15
max_retries = 1
fail_streak = 2
"""


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def setup(tmp_path):
    config = parse_config(CONFIG)
    store = ExperimentStore(tmp_path, "mon").ensure()
    plan = plan_stage(store, config, "coarse")
    for spec in plan.specs:
        store.write_spec(spec.to_dict())
    record_stage(store, "coarse", [s.trial_id for s in plan.specs])
    conn = fakeredis.FakeRedis()
    dispatcher = Dispatcher(conn, "q")
    clock = Clock()
    return config, store, plan.specs, dispatcher, Monitor(store, config, dispatcher, clock), clock


def test_failing_workers_closed_form():
    outcomes = [(1, "a", True, "x"), (2, "a", False, ""), (3, "a", True, "y"), (4, "a", True, "z"),
                (1, "b", True, "x"), (5, "b", True, "w"), (9, "b", False, ""), (2, "c", True, "v")]
    assert failing_workers(outcomes, 2) == {"a": (4, "z")}  # b's last job succeeded; c has one job only
    assert failing_workers(outcomes, 1) == {"a": (4, "z"), "c": (2, "v")}


def test_heartbeat_is_judged_on_our_clock(setup):
    *_, monitor, clock = setup
    assert monitor.alive("w", 5.0, clock.now)  # first sight: alive whatever its (skewed) clock says
    clock.now += 15
    assert monitor.alive("w", 5.0, clock.now)
    clock.now += 0.5
    assert not monitor.alive("w", 5.0, clock.now)  # the same heartbeat for more than 15 s
    assert monitor.alive("w", 6.0, clock.now)  # a new one
    assert not monitor.alive("gone", None, clock.now)  # its key expired


def test_a_missing_job_is_requeued_and_the_reason_recorded(setup):
    config, store, specs, dispatcher, monitor, clock = setup
    dispatcher.enqueue(specs[:2])
    events = monitor.tick()
    assert [(e.kind, e.trial_id) for e in events] == [("requeue", specs[2].trial_id)]
    assert dispatcher.jobs("mon", [specs[2].trial_id])[specs[2].trial_id][0] == "queued"
    (event,) = store.read_events(specs[2].trial_id)
    assert event["event"] == "requeue" and event["state"] == "QUEUED" and "no job in Redis" in event["reason"]
    assert monitor.tick() == []  # nothing more to do while they wait


def test_a_dead_workers_started_job_is_requeued(setup):
    config, store, specs, dispatcher, monitor, clock = setup
    dispatcher.enqueue(specs)
    conn = dispatcher.conn
    conn.hset(Job.key_for(job_id("mon", specs[0].trial_id)), mapping={"status": "started", "worker_name": "w9"})
    conn.hset("rq:worker:w9", "last_heartbeat", "2026-01-01T00:00:00.000000Z")
    assert monitor.tick() == []
    clock.now += 16
    (event,) = monitor.tick()
    assert event.kind == "requeue" and event.message.startswith(f"{specs[0].trial_id}: worker w9 lost heartbeat")
    assert dispatcher.jobs("mon", [specs[0].trial_id])[specs[0].trial_id] == ("queued", None)


def take_without_starting(dispatcher):
    """What RQ's worker does when it takes a job (moves its id to the queue's intermediate list) before it
    records the job started: a worker stopped or killed at that moment leaves the job QUEUED in no queue."""
    queue = dispatcher.queue
    return dispatcher.conn.lmove(queue.key, queue.intermediate_queue_key).decode()


def test_a_job_taken_by_a_worker_that_stopped_before_starting_it_is_requeued_after_a_grace(setup):
    config, store, specs, dispatcher, monitor, clock = setup
    dispatcher.enqueue(specs)
    lost = take_without_starting(dispatcher)
    tid = trial_of(lost)[1]
    assert monitor.tick() == []  # first sight: a worker may be starting it this very moment
    clock.now += UNQUEUED_GRACE_SECONDS - 1
    assert monitor.tick() == []
    clock.now += 1
    (event,) = monitor.tick()
    assert (event.kind, event.trial_id) == ("requeue", tid)
    assert event.message == (f"{tid}: its job left the queue but never started (a worker stopped as it took it); "
                             "requeued, resumes from its last checkpoint")
    assert dispatcher.conn.lrange(dispatcher.queue.intermediate_queue_key, 0, -1) == []  # RQ would fail it later
    assert lost.encode() in dispatcher.conn.lrange(dispatcher.queue.key, 0, -1)
    assert [e["event"] for e in store.read_events(tid)] == ["requeue"]
    clock.now += 60
    assert monitor.tick() == []  # the other trials never left the queue


def test_a_job_out_of_the_queue_for_less_than_the_grace_is_left_to_its_worker(setup):
    config, store, specs, dispatcher, monitor, clock = setup
    dispatcher.enqueue(specs)
    taken = take_without_starting(dispatcher)
    assert monitor.tick() == []
    clock.now += UNQUEUED_GRACE_SECONDS / 2
    dispatcher.conn.hset(Job.key_for(taken), mapping={"status": "started", "worker_name": "w1"})  # it started
    dispatcher.conn.hset("rq:worker:w1", "last_heartbeat", "2026-01-01T00:00:00.000000Z")
    assert monitor.tick() == []
    dispatcher.conn.hset(Job.key_for(taken), "status", "queued")  # handed back, then taken again by a worker
    clock.now += UNQUEUED_GRACE_SECONDS - 1  # a new grace from this sight, not from the first
    assert monitor.tick() == []


def test_unqueued_counts_only_queued_jobs_of_this_queue(setup):
    config, store, specs, dispatcher, monitor, clock = setup
    ids = [s.trial_id for s in specs]
    dispatcher.enqueue(specs)
    assert dispatcher.unqueued("mon", ids) == set()
    for _ in specs:
        take_without_starting(dispatcher)
    conn = dispatcher.conn
    conn.hset(Job.key_for(job_id("mon", ids[1])), "status", "deferred")
    conn.hset(Job.key_for(job_id("mon", ids[2])), "origin", "another-queue")
    assert dispatcher.unqueued("mon", ids) == {ids[0]}
    assert dispatcher.unqueued("mon", []) == set()


def test_failed_trials_are_retried_up_to_the_limit_and_a_failing_worker_is_quarantined(setup, monkeypatch):
    config, store, specs, dispatcher, monitor, clock = setup
    dispatcher.enqueue(specs)
    shut = []
    monkeypatch.setattr(dispatcher, "shutdown_worker", shut.append)
    for i, spec in enumerate(specs[:2]):
        record_result(store, spec.trial_id, {"state": "FAILED", "reason": "DataError: broken", "worker": "bad",
                                           "finished_at": 10.0 + i})
    events = monitor.tick()
    assert [e.kind for e in events] == ["quarantine", "retry", "retry"]
    assert shut == ["bad"] and "its last 2 jobs failed (last: DataError: broken)" in events[0].message
    assert store.read_result(specs[0].trial_id).state == "QUEUED"  # queued again
    assert Monitor(store, config, dispatcher, clock).tick() == []  # a restarted master: same streak, no new shutdown
    assert {o[1:3] for o in worker_outcomes(store, [s.trial_id for s in specs])} == {("bad", True)}
    record_result(store, specs[0].trial_id, {"state": "FAILED", "reason": "DataError: broken", "worker": "bad",
                                           "finished_at": 20.0})
    assert [e.kind for e in monitor.tick()] == ["quarantine"]  # a new streak; no retry left for coarse-0000
    assert shut == ["bad", "bad"]


def test_sanity_failures_are_neither_retried_nor_blamed_on_the_worker(setup):
    config, store, specs, dispatcher, monitor, clock = setup
    dispatcher.enqueue(specs)
    for i, spec in enumerate(specs[:2]):
        record_result(store, spec.trial_id, {"state": "FAILED", "reason": "sanity check overfit failed", "worker": "w",
                                           "finished_at": float(i)})
    assert monitor.tick() == []


def test_move_to_diverged_requests_a_stop_that_ends_the_trial_diverged(setup):
    config, store, specs, dispatcher, monitor, clock = setup
    request_stop(store, dispatcher, specs[0], TrialState.DIVERGED, "loss 7 above 3x the initial loss 2 at epoch 1")
    assert stopped_as(dispatcher.conn.get(stop_key("mon", specs[0].trial_id)).decode()) == \
        (TrialState.DIVERGED, "loss 7 above 3x the initial loss 2 at epoch 1")

    class Control(NullControl):
        def should_stop(self):
            return dispatcher.conn.get(stop_key("mon", specs[0].trial_id)).decode()

    result = run_trial(specs[0], store, Control())
    assert (result.state, result.reason) == ("DIVERGED", "loss 7 above 3x the initial loss 2 at epoch 1")
    with pytest.raises(ValueError, match="ends a trial KILLED or DIVERGED, not COMPLETED"):
        request_stop(store, dispatcher, specs[1], TrialState.COMPLETED, "")


def test_requeue_keeps_a_pending_stop_request(setup):
    config, store, specs, dispatcher, monitor, clock = setup
    dispatcher.enqueue(specs[:1])
    dispatcher.request_stop("mon", specs[0].trial_id, "stopped by user")
    assert dispatcher.requeue(specs[:1]) == [specs[0].trial_id]
    assert dispatcher.conn.get(stop_key("mon", specs[0].trial_id)) == b"stopped by user"
    assert read_progress(dispatcher.conn, "mon")[specs[0].trial_id]["state"] == "QUEUED"


def test_a_finished_stage_is_closed_with_its_flags(setup):
    config, store, specs, dispatcher, monitor, clock = setup
    for i, spec in enumerate(specs):
        record_result(store, spec.trial_id, {"state": "COMPLETED", "best_val_acc": 0.5 + i / 10, "worker": "w",
                                           "finished_at": float(i)})
    dispatcher.enqueue(specs)  # jobs exist (queued): results are what count
    events = monitor.tick()
    assert events[0].kind == "stage" and events[0].message == "stage coarse completed: 3 COMPLETED"
    record = store.read_stage("coarse")
    assert record.status == "completed" and record.flags is not None and record.closed
    assert monitor.done() and monitor.tick() == []


def test_a_stop_not_honoured_within_the_grace_period_gets_rqs_stop_job_command(setup, monkeypatch):
    config, store, specs, dispatcher, monitor, clock = setup
    dispatcher.enqueue(specs)
    tid = specs[0].trial_id
    sent = []
    monkeypatch.setattr(dispatcher, "stop_job", lambda exp, t: sent.append(t) or True)
    dispatcher.conn.hset(Job.key_for(job_id("mon", tid)), mapping={"status": "started", "worker_name": "w1"})
    dispatcher.conn.hset("rq:worker:w1", "last_heartbeat", "2026-01-01T00:00:00.000000Z")
    monitor.stops[tid] = (clock.now, False)  # a stop requested by the rules at this moment
    assert monitor.tick() == [] and sent == []
    clock.now += config.watch.stop_grace + 0.1
    dispatcher.conn.hset("rq:worker:w1", "last_heartbeat", "2026-01-01T00:00:01.000000Z")  # still alive
    (event,) = monitor.tick()
    assert event.kind == "stop-job" and sent == [tid]
    assert monitor.tick() == []  # sent once


def test_slow_ticks_space_out_so_looking_takes_a_bounded_share_of_the_time(setup):
    config, store, specs, dispatcher, monitor, clock = setup
    assert next_look(2.0, 0.1) == 2.0
    assert next_look(2.0, 1.0) * WATCH_DUTY == pytest.approx(1.0 - WATCH_DUTY)  # 1 s looking, 4 s waiting
    waits = []
    monitor.tick = lambda: time.sleep(0.6) or []  # a stage of tens of thousands of trials
    monitor.done = lambda: len(waits) == 2
    watch(monitor, sleep=waits.append)
    assert len(waits) == 2 and all(w >= 0.6 * (1 - WATCH_DUTY) / WATCH_DUTY for w in waits)


def exploding(store, specs, dispatcher):
    """The first trial, running on a live worker w1 with a loss 50 times its initial one; returns its id."""
    dispatcher.enqueue(specs)
    tid = specs[0].trial_id
    dispatcher.conn.hset(Job.key_for(job_id("mon", tid)), mapping={"status": "started", "worker_name": "w1"})
    dispatcher.conn.hset("rq:worker:w1", "last_heartbeat", "2026-01-01T00:00:00.000000Z")
    record_result(store, tid, {"state": "RUNNING"})
    dispatcher.conn.hset(progress_key("mon", tid), mapping={"state": "RUNNING", "worker": "w1", "epoch": 1,
                                                             "initial_loss": 1.0, "last_loss": 50.0})
    return tid


def test_a_stop_that_comes_after_the_trial_finished_is_said_to_be_too_late_on_screen_and_in_storage(setup):
    config, store, specs, dispatcher, monitor, clock = setup
    tid = exploding(store, specs, dispatcher)
    (stop,) = monitor.tick()
    assert stop.kind == "stop" and stop.message.startswith(f"{tid}: stopping (DIVERGED)")
    # the worker finished its last epoch before it looked at the request: the trial ends COMPLETED
    store.transition(tid, TrialState.COMPLETED, "trained 2 epochs", "finished", epochs_done=2)
    dispatcher.conn.hset(Job.key_for(job_id("mon", tid)), "status", "finished")
    late = [e for e in monitor.tick() if e.trial_id == tid]
    assert [e.kind for e in late] == ["stop-late"]
    assert late[0].message == (f"{tid}: the stop (DIVERGED) came too late: the trial had already ended COMPLETED "
                               f"(trained 2 epochs)")
    recorded = store.read_events(tid)[-1]
    assert (recorded["event"], recorded["state"]) == ("stop too late", "COMPLETED")
    assert store.read_result(tid).state == "COMPLETED"  # what storage records and what the screen said agree
    assert [e for e in monitor.tick() if e.trial_id == tid] == []  # said once


def test_no_stop_is_requested_for_a_trial_that_ended_while_the_tick_looked(setup, monkeypatch):
    config, store, specs, dispatcher, monitor, clock = setup
    tid = exploding(store, specs, dispatcher)
    police = monitor._police

    def finished_meanwhile(*args):
        store.transition(tid, TrialState.COMPLETED, "trained 2 epochs", "finished", epochs_done=2)
        return police(*args)

    monkeypatch.setattr(monitor, "_police", finished_meanwhile)
    assert [e for e in monitor.tick() if e.trial_id == tid] == []
    assert dispatcher.conn.get(stop_key("mon", tid)) is None
