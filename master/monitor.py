"""The watch loop: stop bad trials, requeue lost ones, retry failed ones, quarantine failing workers, close stages."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable


from master.config import ExperimentConfig
from master.dispatch import REFUSED_FIELD, Dispatcher, JobView, RedisError
from master.pruning import Rule, TrialView, should_kill
from master.stages import (border_flags, flag_messages, launched_stages, next_stage, previous_stage, retries,
                           stage_space, stage_status)
from worker.records import StageRecord, TrialResult
from worker.spec import TrialSpec
from worker.states import StageStatus, TrialState
from worker.store import ExperimentStore
from worker.trainer import REFUSED

log = logging.getLogger(__name__)

SANITY_PREFIX = "sanity check"  # a trial that fails its sanity checks is the config's fault, not the worker's
NOT_WORKER_FAULTS = (SANITY_PREFIX, REFUSED)  # a FAILED reason starting so is the input's fault: no retry
WATCH_DUTY = 0.2  # the watch loop looks at most this share of the time (a tick reads every trial's files)
UNQUEUED_GRACE_SECONDS = 10.0  # a queued job out of its queue's list this long was taken by no running worker


@dataclass(frozen=True)
class Event:
    """One thing the monitor did or noticed, for the console and the log."""

    kind: str  # "stop", "stop-late", "refused", "requeue", "retry", "stop-job", "quarantine", "flag", "stage"
    message: str
    trial_id: str | None = None


def enqueue(store: ExperimentStore, dispatcher: Dispatcher, specs: list[TrialSpec], force: bool = False) -> list[str]:
    """Queue the trials that have no job and no outcome yet (``force``: those with an outcome too; they resume
    from their checkpoints), recording each QUEUED; returns the ids enqueued. Never enqueues a trial twice."""
    if not force:
        specs = [s for s in specs if not ((r := store.read_result(s.trial_id)) and r.terminal)]

    def record(chosen: list[TrialSpec]) -> None:
        for spec in chosen:
            store.transition(spec.trial_id, TrialState.QUEUED, "re-run (--force)" if force else "launched", "queued")

    return dispatcher.enqueue(specs, force=force, on_enqueue=record, experiment_id=experiment_id(store))


def experiment_id(store: ExperimentStore) -> str:
    """The experiment's id (experiment.json), which its jobs carry; "" for an experiment recorded without one."""
    record = store.read_experiment()
    return record.id if record is not None else ""


def requeue(store: ExperimentStore, dispatcher: Dispatcher, spec: TrialSpec, reason: str, event: str,
            **details: Any) -> None:
    """Put a trial back in the queue (its worker died, Redis lost its job, a retry): record it QUEUED with the
    reason, then requeue its job; it resumes from its last checkpoint."""
    store.transition(spec.trial_id, TrialState.QUEUED, reason, event, details)
    dispatcher.requeue([spec], experiment_id(store))
    log.info("trial %s -> QUEUED: %s", spec.trial_id, reason)


def request_stop(store: ExperimentStore, dispatcher: Dispatcher, spec: TrialSpec, state: TrialState,
                 reason: str) -> None:
    """Ask for a trial to end ``state`` (KILLED or DIVERGED): the worker honours it between two batches, keeps
    its checkpoints and records the outcome; the request is kept in events.jsonl."""
    store.append_event(spec.trial_id, {"time": time.time(), "event": "stop", "state": state.value, "reason": reason})
    dispatcher.request_stop(spec.experiment, spec.trial_id, reason, state)
    log.info("trial %s: stop requested (%s): %s", spec.trial_id, state.value, reason)


def is_error(result: TrialResult) -> bool:
    """A FAILED result caused by an error (not by the trial's own failed sanity checks, nor a refused input)."""
    return result.state is TrialState.FAILED and not result.reason.startswith(NOT_WORKER_FAULTS)


def worker_outcomes(store: ExperimentStore, trial_ids: list[str]) -> list[tuple[float, str, bool, str]]:
    """(time, worker, failed with an error, reason) of every job outcome on record: current results, and the
    failures that retries replaced (kept in events.jsonl)."""
    out = []
    for tid in trial_ids:
        result = store.read_result(tid)
        if result is not None and result.terminal and result.worker:
            out.append((float(result.finished_at or 0), result.worker, is_error(result), result.reason))
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


class Monitor:
    """Follows one experiment through Redis and shared storage; ``tick()`` looks once and acts."""

    def __init__(self, store: ExperimentStore, config: ExperimentConfig, dispatcher: Dispatcher,
                 clock: Callable[[], float] = time.time):
        self.store, self.config, self.dispatcher, self.clock = store, config, dispatcher, clock
        self.watch = config.watch
        self.stops: dict[str, tuple[float, bool]] = {}  # trial -> (stop requested at, RQ stop-job sent)
        self.asked: dict[str, TrialState] = {}  # trial -> the state its stop request asked for
        self.refusals: dict[str, str] = {}  # trial -> the refusal of a worker with another storage, told once
        self.beats: dict[str, tuple[float, float]] = {}  # worker -> (heartbeat seen, when it was first seen)
        self.specs: dict[str, TrialSpec] = {}  # trial -> its spec, parsed once (a recorded spec.json never changes)
        self.unqueued: dict[str, float] = {}  # trial -> when its QUEUED job was first seen out of the queue's list

    # the loop ---------------------------------------------------------------------------------
    def tick(self) -> list[Event]:
        """Look once: quarantine, retry, requeue, stop, fall back to RQ's stop-job, close finished stages."""
        now = self.clock()
        stages = launched_stages(self.store, self.config)
        ids = [tid for record in stages for tid in record.trial_ids]
        exp = self.store.experiment
        jobs = self.dispatcher.jobs(exp, ids)  # read before the results: a job that ends in between is seen done
        progress = self.dispatcher.progress(exp)
        results = {tid: self.store.read_result(tid) for tid in ids}
        runners = {job.worker for job in jobs.values() if job.running and job.worker}
        runners |= {p["worker"] for p in progress.values()
                    if p.get("state") == TrialState.RUNNING.value and p.get("worker")}
        beats = self.dispatcher.heartbeats(sorted(runners))
        events = self._quarantine(ids)
        stranded = self._stranded(jobs, now)
        running: set[str] = set()
        for tid in ids:
            spec = self._spec(tid)
            if spec is None:
                continue
            job, result = jobs.get(tid, JobView(None, None)), results[tid]
            if result is not None and result.terminal:
                self.stops.pop(tid, None)
                events += self._too_late(tid, result)
                if not job.running:  # else RQ is still recording the job's end
                    events += self._retry(spec, result)
            else:
                events += self._reconcile(spec, job, progress.get(tid, {}), beats, now, running,
                                          tid in stranded)
        for record in stages:
            events += self._police(record, [t for t in record.trial_ids if t in running], progress, now)
        events += self._fallback(jobs, now)
        events += self._close(stages)
        for e in events:
            log.info("%s", e.message)
        return events

    def done(self) -> bool:
        """Whether every launched stage has all its trials finished (failed ones out of retries)."""
        return all(stage_status(self.store, r.trial_ids, self.watch.max_retries).finished
                   for r in launched_stages(self.store, self.config))

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
        exp = self.store.experiment
        for worker, (at, reason) in failing_workers(worker_outcomes(self.store, ids), self.watch.fail_streak).items():
            if self.dispatcher.quarantined_at(exp, worker) == repr(at):
                continue
            self.dispatcher.mark_quarantined(exp, worker, repr(at))
            self.dispatcher.shutdown_worker(worker)
            events.append(Event("quarantine", f"worker {worker} quarantined: its last {self.watch.fail_streak} jobs "
                                              f"failed (last: {reason}); sent RQ's shutdown command"))
        return events

    # trials -----------------------------------------------------------------------------------
    def _retry(self, spec: TrialSpec, result: TrialResult) -> list[Event]:
        if not is_error(result) or retries(self.store, spec.trial_id) >= self.watch.max_retries:
            return []
        n = retries(self.store, spec.trial_id) + 1
        reason = f"retry {n} of {self.watch.max_retries} after failing on {result.worker}: {result.reason}"
        requeue(self.store, self.dispatcher, spec, reason, "retry", worker=result.worker, failed_at=result.finished_at)
        return [Event("retry", f"{spec.trial_id}: {reason}", spec.trial_id)]

    def _stranded(self, jobs: dict[str, JobView], now: float) -> set[str]:
        """The trials whose QUEUED job has been out of the queue's list for ``UNQUEUED_GRACE_SECONDS``: a worker
        took it and stopped (RQ's shutdown command, a signal, a crash) before starting it, so no worker ever will."""
        queued = [tid for tid, job in jobs.items() if job.queued]
        out = self.dispatcher.unqueued(self.store.experiment, queued) if queued else set()
        self.unqueued = {tid: self.unqueued.get(tid, now) for tid in out}
        return {tid for tid, since in self.unqueued.items() if now - since >= UNQUEUED_GRACE_SECONDS}

    def _reconcile(self, spec: TrialSpec, job: JobView, live: dict[str, Any], beats: dict[str, float | None],
                   now: float, running: set[str], stranded: bool) -> list[Event]:
        """An unfinished trial: leave it waiting or running, or put it back in the queue when nothing runs it
        (its worker died, it stopped as it took the job, or Redis lost the job); it resumes from its last
        checkpoint."""
        if job.waiting and not stranded:
            return self._refused(spec, live.get(REFUSED_FIELD))
        live_runner = live.get("worker") if live.get("state") == TrialState.RUNNING.value else None
        runner = job.worker if job.running else live_runner
        if runner and self.alive(runner, beats.get(runner), now):
            running.add(spec.trial_id)
            return []
        if stranded:
            reason = "its job left the queue but never started (a worker stopped as it took it)"
        elif job.running:
            reason = f"worker {job.worker} lost heartbeat"
        elif self.store.result_unreadable(spec.trial_id):
            reason = "its result.json is unreadable (corrupt)"
        elif job.missing:
            reason = "no job in Redis (Redis restarted empty, or the trial was never enqueued)"
        else:
            reason = f"job {job.status} without a result"
        requeue(self.store, self.dispatcher, spec, reason, "requeue", worker=runner)
        return [Event("requeue", f"{spec.trial_id}: {reason}; requeued, resumes from its last checkpoint",
                      spec.trial_id)]

    def _refused(self, spec: TrialSpec, reason: Any) -> list[Event]:
        """A waiting trial a worker handed back untouched (its storage is not the experiment's): say why, once."""
        if not reason or self.refusals.get(spec.trial_id) == reason:
            return []
        self.refusals[spec.trial_id] = reason
        self.store.append_event(spec.trial_id, {"time": self.clock(), "event": "refused",
                                                "state": TrialState.QUEUED.value, "reason": str(reason)})
        return [Event("refused", f"{spec.trial_id}: {reason} (it waits in the queue for a worker on this storage)",
                      spec.trial_id)]

    def _too_late(self, tid: str, result: TrialResult) -> list[Event]:
        """A trial that ended otherwise than its stop request asked (it finished first): say so, and record it."""
        asked = self.asked.pop(tid, None)
        if asked is None or result.state is asked:
            return []
        message = f"the stop ({asked.value}) came too late: the trial had already ended {result.state.value}"
        self.store.append_event(tid, {"time": self.clock(), "event": "stop too late", "state": result.state.value,
                                      "reason": message})
        return [Event("stop-late", f"{tid}: {message} ({result.reason})", tid)]

    def _police(self, record: StageRecord, running: list[str], progress: dict[str, dict[str, Any]],
                now: float) -> list[Event]:
        """Apply the stage's stopping rule to its running trials (peers: every trial of the stage)."""
        if not running:
            return []
        cfg = self.config.stage(record.stage)
        before = previous_stage(self.config, record.stage)
        rule = Rule.of(cfg, self.watch, before.epochs if cfg.method == "promote" and before else 0,
                       self.config.stages[0].epochs if before else 0)
        views = {tid: TrialView.from_history(tid, self.store.read_history(tid), progress.get(tid))
                 for tid in record.trial_ids}
        events = []
        for tid in running:
            if tid in self.stops:
                continue
            verdict = should_kill(views[tid], [v for t, v in views.items() if t != tid], rule, now)
            if verdict is None or ((ended := self.store.read_result(tid)) is not None and ended.terminal):
                continue  # (a trial that ended since the tick began is told apart by the next one)
            request_stop(self.store, self.dispatcher, self._spec(tid), verdict.state, verdict.reason)
            self.stops[tid], self.asked[tid] = (now, False), verdict.state
            events.append(Event("stop", f"{tid}: stopping ({verdict.state.value}): {verdict.reason}", tid))
        return events

    def _fallback(self, jobs: dict[str, JobView], now: float) -> list[Event]:
        """RQ's stop-job command for trials still running ``stop_grace`` seconds after a cooperative request."""
        events = []
        for tid, (at, sent) in list(self.stops.items()):
            if sent or now - at < self.watch.stop_grace or not jobs.get(tid, JobView(None, None)).running:
                continue
            self.stops[tid] = (at, True)
            if self.dispatcher.stop_job(self.store.experiment, tid):
                events.append(Event("stop-job", f"{tid}: still running {now - at:.0f} s after the stop request; "
                                                "sent RQ's stop-job command", tid))
        return events

    def _close(self, stages: list[StageRecord]) -> list[Event]:
        """Mark stages whose trials have all finished as completed, with their border flags."""
        events = []
        for record in stages:
            if record.closed:
                continue
            status = stage_status(self.store, record.trial_ids, self.watch.max_retries)
            if not status.finished:
                continue
            events += close_stage(self.store, self.config, record.stage, status.describe())
        return events


def close_stage(store: ExperimentStore, config: ExperimentConfig, stage: str, summary: str) -> list[Event]:
    """Record a finished stage (status, counts) and its border flags in stages/<stage>.json."""
    flags = border_flags(store, config, stage)
    messages = flag_messages(flags, stage_space(store, config, stage), last=next_stage(config, stage) is None)
    store.set_stage_status(stage, StageStatus.COMPLETED, summary=summary, flags=tuple(f.to_dict() for f in flags),
                           flag_messages=tuple(messages))
    return [Event("stage", f"stage {stage} completed: {summary}")] + [Event("flag", m) for m in messages]


def next_look(poll_seconds: float, tick_seconds: float) -> float:
    """Seconds until the next tick: ``poll_seconds``, or longer after a slow tick (a stage of many thousand
    trials), so that looking takes at most WATCH_DUTY of the master's time."""
    return max(poll_seconds, tick_seconds * (1 - WATCH_DUTY) / WATCH_DUTY)


def watch(monitor: Monitor, *, until_done: bool = True, on_event: Callable[[Event], None] = lambda e: None,
          look: Callable[[], bool] | None = None, look_seconds: float = 0.3,
          sleep: Callable[[float], None] = time.sleep) -> None:
    """The watch loop: tick every ``poll_seconds`` (see next_look) until every launched stage is done (or for
    ever); with ``look``, also call it every ``look_seconds`` between ticks (a progress display) and return once
    it answers True. Redis hiccups only warn."""
    next_tick, wait = 0.0, 0.0
    while True:
        started = time.monotonic()
        if started >= next_tick:
            try:
                for event in monitor.tick():
                    on_event(event)
            except RedisError as exc:
                log.warning("cannot reach Redis this time: %s", exc)
            except OSError as exc:  # storage full, read-only or gone: the next tick tries again
                log.warning("cannot write to shared storage this time: %s", exc)
            wait = next_look(monitor.watch.poll_seconds, time.monotonic() - started)
            next_tick = time.monotonic() + wait
        if look is None:
            if until_done and monitor.done():
                return
            sleep(wait)
            continue
        looked = time.monotonic()
        if look():
            return
        sleep(max(0.0, min(next_tick - time.monotonic(), next_look(look_seconds, time.monotonic() - looked))))
