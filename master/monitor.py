"""The watch loop: stop bad trials, requeue lost ones, retry failed ones, quarantine failing workers, close stages."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import redis

from master.dispatch import Dispatcher
from master.pruning import Rule, TrialView, should_kill
from master.space import ExperimentConfig
from master.stages import border_flags, flag_messages, previous_stage, retries, stage_space, stage_status
from worker.spec import TERMINAL_STATES, TrialSpec, TrialState
from worker.store import ExperimentStore

log = logging.getLogger(__name__)

TERMINAL = {s.value for s in TERMINAL_STATES}
WAITING_JOBS = {"queued", "deferred", "scheduled"}
SANITY_PREFIX = "sanity check"  # a trial that fails its sanity checks is the config's fault, not the worker's
STAGE_DONE = "completed"
WATCH_DUTY = 0.2  # the watch loop looks at most this share of the time (a tick reads every trial's files)


@dataclass(frozen=True)
class Event:
    """One thing the monitor did or noticed, for the console and the log."""

    kind: str  # "stop", "requeue", "retry", "stop-job", "quarantine", "flag", "stage"
    message: str
    trial_id: str | None = None


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def move(store: ExperimentStore, dispatcher: Dispatcher, spec: TrialSpec, to: TrialState, reason: str,
         event: str, **details: Any) -> None:
    """The one place the master moves a trial: back to QUEUED (requeue, retry), or to KILLED / DIVERGED
    (a stop request the worker honours between batches, keeping its checkpoints). The why goes to events.jsonl."""
    store.append_event(spec.trial_id, {"time": time.time(), "event": event, "state": to.value, "reason": reason,
                                       **details})
    if to is TrialState.QUEUED:
        dispatcher.requeue([spec])
    elif to in (TrialState.KILLED, TrialState.DIVERGED):
        dispatcher.request_stop(spec.experiment, spec.trial_id, reason, to)
    else:
        raise ValueError(f"the master does not move trials to {to.value}")
    log.info("trial %s -> %s: %s", spec.trial_id, to.value, reason)


def is_error(result: dict[str, Any]) -> bool:
    """A FAILED result caused by an error (not by the trial's own failed sanity checks)."""
    reason = str(result.get("reason", ""))
    return result.get("state") == TrialState.FAILED.value and not reason.startswith(SANITY_PREFIX)


def worker_outcomes(store: ExperimentStore, trial_ids: list[str]) -> list[tuple[float, str, bool, str]]:
    """(time, worker, failed with an error, reason) of every job outcome on record: current results, and the
    failures that retries replaced (kept in events.jsonl)."""
    out = []
    for tid in trial_ids:
        result = store.read_result(tid) or {}
        if result.get("state") in TERMINAL and result.get("worker"):
            out.append((float(result.get("finished_at") or 0), result["worker"], is_error(result),
                        str(result.get("reason", ""))))
        out += [(float(e.get("failed_at") or 0), e["worker"], True, str(e.get("reason", "")))
                for e in store.read_events(tid) if e.get("event") == "retry" and e.get("worker")]
    return out


def failing_workers(outcomes: list[tuple[float, str, bool, str]], streak: int) -> dict[str, tuple[float, str]]:
    """{worker: (time, reason) of its last failure} for workers whose last ``streak`` jobs all failed."""
    by_worker: dict[str, list[tuple[float, bool, str]]] = {}
    for at, worker, failed, reason in sorted(outcomes):
        by_worker.setdefault(worker, []).append((at, failed, reason))
    bad = {}
    for worker, seq in by_worker.items():
        last = seq[-streak:]
        if len(last) == streak and all(failed for _, failed, _ in last):
            bad[worker] = (last[-1][0], last[-1][2])
    return bad


def quarantine_key(experiment: str) -> str:
    """Redis hash: worker -> the time of the failure it was quarantined (shut down) for."""
    return f"hs:{experiment}:quarantined"


def launched_stages(store: ExperimentStore, config: ExperimentConfig) -> list[tuple[str, dict[str, Any]]]:
    """(stage, record) of the config's stages that have been launched, in order."""
    out = []
    for stage in config.stages:
        record = store.read_stage(stage.name)
        if isinstance(record, dict) and record.get("trial_ids"):
            out.append((stage.name, record))
    return out


class Monitor:
    """Follows one experiment through Redis and shared storage; ``tick()`` looks once and acts."""

    def __init__(self, store: ExperimentStore, config: ExperimentConfig, dispatcher: Dispatcher,
                 clock: Callable[[], float] = time.time):
        self.store, self.config, self.dispatcher, self.clock = store, config, dispatcher, clock
        self.watch = config.watch
        self.stops: dict[str, tuple[float, bool]] = {}  # trial -> (stop requested at, RQ stop-job sent)
        self.beats: dict[str, tuple[float, float]] = {}  # worker -> (heartbeat seen, when it was first seen)
        self.specs: dict[str, TrialSpec] = {}  # trial -> its spec, parsed once (a recorded spec.json never changes)

    # the loop ---------------------------------------------------------------------------------
    def tick(self) -> list[Event]:
        """Look once: quarantine, retry, requeue, stop, fall back to RQ's stop-job, close finished stages."""
        now = self.clock()
        stages = launched_stages(self.store, self.config)
        ids = [tid for _, record in stages for tid in record["trial_ids"]]
        exp = self.store.experiment
        jobs = self.dispatcher.jobs(exp, ids)  # read before the results: a job that ends in between is seen done
        progress = self.dispatcher.progress(exp)
        results = {tid: self.store.read_result(tid) or {} for tid in ids}
        runners = {w for s, w in jobs.values() if s == "started" and w}
        runners |= {p["worker"] for p in progress.values() if p.get("state") == "RUNNING" and p.get("worker")}
        beats = self.dispatcher.heartbeats(sorted(runners))
        events = self._quarantine(ids)
        running: set[str] = set()
        for tid in ids:
            spec = self._spec(tid)
            if spec is None:
                continue
            if results[tid].get("state") in TERMINAL:
                self.stops.pop(tid, None)
                if jobs.get(tid, (None,))[0] != "started":  # else RQ is still recording the job's end
                    events += self._retry(spec, results[tid])
            else:
                events += self._reconcile(spec, jobs.get(tid, (None, None)), progress.get(tid, {}), beats, now,
                                          running)
        for stage, record in stages:
            events += self._police(stage, [t for t in record["trial_ids"] if t in running], progress, now)
        events += self._fallback(jobs, now)
        events += self._close(stages)
        for e in events:
            log.info("%s", e.message)
        return events

    def done(self) -> bool:
        """Whether every launched stage has all its trials finished (failed ones out of retries)."""
        return all(stage_status(self.store, r["trial_ids"], self.watch.max_retries).finished
                   for _, r in launched_stages(self.store, self.config))

    def _spec(self, tid: str) -> TrialSpec | None:
        if tid not in self.specs:
            try:
                self.specs[tid] = TrialSpec.from_dict(self.store.read_spec(tid))
            except (ValueError, TypeError) as exc:
                log.warning("trial %s: unreadable spec.json (%s); not watched", tid, exc)
                return None
        return self.specs[tid]

    # workers ----------------------------------------------------------------------------------
    def alive(self, worker: str, beat: float | None, now: float) -> bool:
        """Whether ``worker`` has sent a heartbeat within ``heartbeat_seconds`` (judged by our own clock, from
        when we first saw its latest heartbeat, so clock skew between machines does not matter)."""
        if beat is None:  # its key expired: gone for over a minute
            return False
        seen, since = self.beats.get(worker, (None, now))
        if beat != seen:
            self.beats[worker] = (beat, now)
            return True
        return now - since <= self.watch.heartbeat_seconds

    def _quarantine(self, ids: list[str]) -> list[Event]:
        """Shut down each worker whose last ``fail_streak`` jobs failed, once per streak (remembered in Redis,
        so a restarted master does not shut down a worker restarted since under the same name)."""
        events = []
        key = quarantine_key(self.store.experiment)
        for worker, (at, reason) in failing_workers(worker_outcomes(self.store, ids), self.watch.fail_streak).items():
            if self.dispatcher.conn.hget(key, worker) == repr(at).encode():
                continue
            self.dispatcher.conn.hset(key, worker, repr(at))
            self.dispatcher.shutdown_worker(worker)
            events.append(Event("quarantine", f"worker {worker} quarantined: its last {self.watch.fail_streak} jobs "
                                              f"failed (last: {reason}); sent RQ's shutdown command"))
        return events

    # trials -----------------------------------------------------------------------------------
    def _retry(self, spec: TrialSpec, result: dict[str, Any]) -> list[Event]:
        if not is_error(result) or retries(self.store, spec.trial_id) >= self.watch.max_retries:
            return []
        n = retries(self.store, spec.trial_id) + 1
        reason = (f"retry {n} of {self.watch.max_retries} after failing on {result.get('worker')}: "
                  f"{result.get('reason')}")
        move(self.store, self.dispatcher, spec, TrialState.QUEUED, reason, "retry", worker=result.get("worker"),
             failed_at=result.get("finished_at"))
        return [Event("retry", f"{spec.trial_id}: {reason}", spec.trial_id)]

    def _reconcile(self, spec: TrialSpec, job: tuple[str | None, str | None], live: dict[str, Any],
                   beats: dict[str, float | None], now: float, running: set[str]) -> list[Event]:
        """An unfinished trial: leave it waiting or running, or put it back in the queue when nothing runs it
        (its worker died, or Redis lost its job); it resumes from its last checkpoint."""
        status, worker = job
        if status in WAITING_JOBS:
            return []
        runner = worker if status == "started" else live.get("worker") if live.get("state") == "RUNNING" else None
        if runner and self.alive(runner, beats.get(runner), now):
            running.add(spec.trial_id)
            return []
        if status == "started":
            reason = f"worker {worker} lost heartbeat"
        elif status is None:
            reason = "no job in Redis (Redis restarted empty, or the trial was never enqueued)"
        else:
            reason = f"job {status} without a result"
        move(self.store, self.dispatcher, spec, TrialState.QUEUED, reason, "requeue", worker=runner)
        return [Event("requeue", f"{spec.trial_id}: {reason}; requeued, resumes from its last checkpoint",
                      spec.trial_id)]

    def _police(self, stage: str, running: list[str], progress: dict[str, dict[str, Any]],
                now: float) -> list[Event]:
        """Apply the stage's stopping rule to its running trials (peers: every trial of the stage)."""
        if not running:
            return []
        cfg = self.config.stage(stage)
        before = previous_stage(self.config, stage)
        rule = Rule.of(cfg, self.watch, before.epochs if cfg.method == "promote" and before else 0)
        record = self.store.read_stage(stage) or {}
        views = {tid: TrialView.from_history(tid, self.store.read_history(tid), progress.get(tid))
                 for tid in record.get("trial_ids", [])}
        events = []
        for tid in running:
            if tid in self.stops:
                continue
            verdict = should_kill(views[tid], [v for t, v in views.items() if t != tid], rule, now)
            if verdict is None:
                continue
            spec = self._spec(tid)
            move(self.store, self.dispatcher, spec, verdict.state, verdict.reason, "stop")
            self.stops[tid] = (now, False)
            events.append(Event("stop", f"{tid}: stopping ({verdict.state.value}): {verdict.reason}", tid))
        return events

    def _fallback(self, jobs: dict[str, tuple[str | None, str | None]], now: float) -> list[Event]:
        """RQ's stop-job command for trials still running ``stop_grace`` seconds after a cooperative request."""
        events = []
        for tid, (at, sent) in list(self.stops.items()):
            if sent or now - at < self.watch.stop_grace or jobs.get(tid, (None,))[0] != "started":
                continue
            self.stops[tid] = (at, True)
            if self.dispatcher.stop_job(self.store.experiment, tid):
                events.append(Event("stop-job", f"{tid}: still running {now - at:.0f} s after the stop request; "
                                                "sent RQ's stop-job command", tid))
        return events

    def _close(self, stages: list[tuple[str, dict[str, Any]]]) -> list[Event]:
        """Mark stages whose trials have all finished as completed, with their border flags."""
        events = []
        for stage, record in stages:
            if record.get("status") == STAGE_DONE and "flags" in record:
                continue
            status = stage_status(self.store, record["trial_ids"], self.watch.max_retries)
            if not status.finished:
                continue
            events += close_stage(self.store, self.config, stage, status.describe())
        return events


def close_stage(store: ExperimentStore, config: ExperimentConfig, stage: str, summary: str) -> list[Event]:
    """Record a finished stage (status, counts) and its border flags in stages/<stage>.json."""
    flags = border_flags(store, config, stage)
    messages = flag_messages(flags, stage_space(store, config, stage))
    record = store.read_stage(stage) or {}
    store.write_stage(stage, {**record, "status": STAGE_DONE, "summary": summary, "updated_at": now_iso(),
                              "flags": [f.to_dict() for f in flags], "flag_messages": messages})
    return [Event("stage", f"stage {stage} completed: {summary}")] + [Event("flag", m) for m in messages]


def next_look(poll_seconds: float, tick_seconds: float) -> float:
    """Seconds until the next tick: ``poll_seconds``, or longer after a slow tick (a stage of many thousand
    trials), so that looking takes at most WATCH_DUTY of the master's time."""
    return max(poll_seconds, tick_seconds * (1 - WATCH_DUTY) / WATCH_DUTY)


def watch(monitor: Monitor, *, until_done: bool = True, on_event: Callable[[Event], None] = lambda e: None,
          sleep: Callable[[float], None] = time.sleep) -> None:
    """Tick every ``poll_seconds`` (see next_look) until every launched stage is done (or forever); Redis
    hiccups only warn."""
    while True:
        started = time.monotonic()
        try:
            for event in monitor.tick():
                on_event(event)
        except redis.RedisError as exc:
            log.warning("cannot reach Redis this time: %s", exc)
        if until_done and monitor.done():
            return
        sleep(next_look(monitor.watch.poll_seconds, time.monotonic() - started))
