"""The master's gateway to Redis and RQ (the only master module that speaks either; it touches no files): JSON
jobs, one per trial, typed views of jobs and workers, stop requests, commands, the quarantine record."""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, NamedTuple

import redis
from rq.command import send_shutdown_command, send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.utils import utcparse
from rq.worker import Worker

from worker.control import (DEFAULT_QUEUE, DEFAULT_REDIS_URL, EXPERIMENT_ID_META, KEY_TTL_SECONDS, REFUSED_FIELD,
                            ControlError, job_key, job_owner, job_record_key, mask_url, open_redis, read_job_owner,
                            read_progress, redis_url, reset_trial, stop_key)
from worker.control import request_stop as _request_stop
from worker.spec import TrialSpec, check_name
from worker.states import TrialState

__all__ = ["REFUSED_FIELD", "DispatchError", "Dispatcher", "connect", "job_id", "mask_url", "redis_url", "trial_of"]

log = logging.getLogger(__name__)

JOB_FUNCTION = "worker.jobs.train_trial"
TIMEOUT_BASE_SECONDS = 300  # data loading, sanity checks, the first checkpoint
TIMEOUT_PER_EPOCH_SECONDS = 600  # generous: a job timeout catches a hung trial, not a slow one
FAILURE_TTL_SECONDS = 365 * 24 * 3600
# A finished job (its hash, result and registry entry: ~7 KB) lives as long as the trial's progress hash;
# shared storage is the record, so the master never needs it later (a relaunch reads result.json).
RESULT_TTL_SECONDS = KEY_TTL_SECONDS
ACTIVE_STATUSES = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED}
WAITING_STATUSES = {JobStatus.QUEUED.value, JobStatus.DEFERRED.value, JobStatus.SCHEDULED.value}
_WATCH_RETRIES = 20


RedisError = redis.RedisError  # raised when Redis goes away: callers catch it; only this module speaks Redis


class DispatchError(RuntimeError):
    """Redis cannot be reached or refused a dispatch; the message masks passwords."""


def connect(url: str | None = None) -> redis.Redis:
    """A Redis client that answered PING: ``url``, else $REDIS_URL, else the local default."""
    try:
        return open_redis(redis_url(url) or DEFAULT_REDIS_URL)
    except ControlError as exc:
        raise DispatchError(str(exc)) from None


def _escape(name: str) -> str:
    return name.replace("_", "_u").replace(".", "_d")


def job_id(experiment: str, trial_id: str) -> str:
    """The trial's deterministic RQ job id, ``hs_<experiment>__<trial id>``.

    RQ 3 job ids allow only ``[A-Za-z0-9_-]``, so '_' is written '_u' and '.' '_d'; the mapping stays
    one-to-one (``__`` only ever separates the two names), e.g. ``hs_digits-mlp__coarse-0042``.
    """
    return f"{_job_prefix(experiment)}{_escape(check_name(trial_id, 'trial_id'))}"


def _job_prefix(experiment: str) -> str:
    return f"hs_{_escape(check_name(experiment, 'experiment'))}__"


def trial_of(rq_job_id: str) -> tuple[str, str] | None:
    """(experiment, trial id) of one of our job ids, or None for any other job."""
    if not rq_job_id.startswith("hs_") or "__" not in rq_job_id:
        return None
    experiment, trial = (name.replace("_d", ".").replace("_u", "_") for name in rq_job_id[3:].split("__", 1))
    return experiment, trial


class JobView(NamedTuple):
    """A trial's RQ job as the master sees it: its status (None when Redis has no job) and its worker."""

    status: str | None
    worker: str | None

    @property
    def missing(self) -> bool:
        return self.status is None

    @property
    def waiting(self) -> bool:
        """Queued (or deferred, scheduled): no worker has it yet."""
        return self.status in WAITING_STATUSES

    @property
    def queued(self) -> bool:
        """Queued to run as soon as a worker takes it (not deferred nor scheduled)."""
        return self.status == JobStatus.QUEUED.value

    @property
    def running(self) -> bool:
        """Taken by ``worker`` (which may have died since: the heartbeat tells)."""
        return self.status == JobStatus.STARTED.value


def quarantine_key(experiment: str) -> str:
    """Redis hash: worker -> the time of the failure it was quarantined (shut down) for."""
    return f"hs:{experiment}:quarantined"


class Dispatcher:
    """Enqueues trials (idempotently, by deterministic job id) and reads the queue's and workers' state."""

    def __init__(self, conn: redis.Redis, queue: str = DEFAULT_QUEUE, *,
                 seconds_per_epoch: int = TIMEOUT_PER_EPOCH_SECONDS):
        self.conn = conn
        self.queue = Queue(queue, connection=conn, serializer=JSONSerializer)
        self.seconds_per_epoch = seconds_per_epoch

    def job_timeout(self, spec: TrialSpec) -> int:
        """Seconds a trial's job may run before RQ fails it: a fixed allowance plus one per epoch."""
        return TIMEOUT_BASE_SECONDS + self.seconds_per_epoch * spec.epochs

    def enqueue(self, specs: Iterable[TrialSpec], force: bool = False,
                on_enqueue: Callable[[list[TrialSpec]], None] | None = None, experiment_id: str = "") -> list[str]:
        """Enqueue the trials that have no job yet and return their ids; ``force`` first deletes the jobs
        that ended (finished, failed, stopped), so those trials run again. A trial whose job is queued or running
        is never enqueued twice. ``on_enqueue(specs)`` runs just before the jobs are created (the master records
        the trials QUEUED there). The jobs carry ``experiment_id`` (experiment.json's), which workers check."""
        specs = list(specs)
        wanted = {job_id(s.experiment, s.trial_id): s for s in specs}
        if force:
            self._drop_inactive_jobs(list(wanted))
        enqueued = self._enqueue_missing(wanted, on_enqueue, experiment_id)
        log.info("enqueued %d of %d trials on queue %s", len(enqueued), len(specs), self.queue.name)
        return enqueued

    def _drop_inactive_jobs(self, ids: list[str]) -> None:
        """Delete the jobs (finished, failed, stopped, canceled) among ``ids`` so they can be enqueued afresh."""
        for job in self._fetch(ids):
            if job is None:
                continue
            if job.get_status(refresh=False) in ACTIVE_STATUSES:
                log.warning("trial job %s is %s: not enqueued again", job.id, job.get_status(refresh=False).value)
            else:
                job.delete()

    def _missing(self, ids: list[str]) -> list[str]:
        """The ids among ``ids`` without a job record RQ can read (no key, or a fragment such as the lone
        ``last_heartbeat`` an old worker's heartbeat left after Redis restarted empty): those trials need a job."""
        with self.conn.pipeline(transaction=False) as pipe:
            for jid in ids:
                job_record_key(pipe, Job.key_for(jid))
            return [jid for jid, found in zip(ids, pipe.execute()) if not found]

    def _fetch(self, ids: list[str]) -> list[Job | None]:
        """The jobs of ``ids`` (None where ``_missing``: a fragment counts as no job, it never raises)."""
        missing = set(self._missing(ids))
        known = [jid for jid in ids if jid not in missing]
        jobs = dict(zip(known, Job.fetch_many(known, connection=self.conn, serializer=JSONSerializer)))
        return [jobs.get(jid) for jid in ids]

    def _enqueue_missing(self, wanted: dict[str, TrialSpec], on_enqueue: Callable[[list[TrialSpec]], None] | None,
                         experiment_id: str) -> list[str]:
        """Enqueue the specs whose job key does not exist, in one transaction watching those keys."""
        with self.conn.pipeline() as pipe:
            for _ in range(_WATCH_RETRIES):
                missing = self._missing(list(wanted))
                if not missing:
                    return []
                try:
                    pipe.watch(*[Job.key_for(jid) for jid in missing])
                    if self._missing(missing) != missing:  # one was created before the watch took hold
                        pipe.reset()
                        continue
                    specs = [wanted[jid] for jid in missing]
                    if on_enqueue is not None:
                        on_enqueue(specs)
                    pipe.multi()
                    pipe.delete(*[Job.key_for(jid) for jid in missing])  # fragments RQ could not read
                    for s in specs:
                        reset_trial(pipe, s.experiment, s.trial_id, s.epochs)
                    self.queue.enqueue_many([self._job_data(jid, s, experiment_id) for jid, s in zip(missing, specs)],
                                            pipeline=pipe)
                    pipe.execute()
                    return [s.trial_id for s in specs]
                except redis.WatchError:
                    pipe.reset()
        raise DispatchError(f"could not enqueue {len(wanted)} trials: their jobs kept changing under us")

    def _job_data(self, jid: str, spec: TrialSpec, experiment_id: str) -> Any:
        return Queue.prepare_data(
            JOB_FUNCTION, args=(spec.to_dict(),), job_id=jid, timeout=self.job_timeout(spec),
            result_ttl=RESULT_TTL_SECONDS, failure_ttl=FAILURE_TTL_SECONDS,
            description=f"trial {spec.experiment}/{spec.trial_id}",
            meta={EXPERIMENT_ID_META: experiment_id} if experiment_id else None,
        )

    def progress(self, experiment: str) -> dict[str, dict[str, Any]]:
        """{trial id: live progress fields} of the experiment's trials."""
        return read_progress(self.conn, experiment)

    def request_stop(self, experiment: str, trial_id: str, reason: str = "stopped by user",
                     state: TrialState = TrialState.KILLED) -> None:
        """Ask for a trial to be stopped (honoured within about a second, also if it has not started yet);
        it ends in ``state`` (KILLED, or DIVERGED when the master judged it so)."""
        _request_stop(self.conn, experiment, trial_id, reason, state)

    def stop_job(self, experiment: str, trial_id: str) -> bool:
        """RQ's stop-job command for the trial's running job (the fallback when a cooperative stop is not
        honoured); False when the job is not running."""
        try:
            send_stop_job_command(self.conn, job_id(experiment, trial_id), serializer=JSONSerializer)
        except (InvalidJobOperation, NoSuchJobError):
            return False
        return True

    def shutdown_worker(self, name: str) -> None:
        """RQ's shutdown command: the worker finishes (or, idle, abandons) its current wait and exits."""
        send_shutdown_command(self.conn, name)

    def jobs(self, experiment: str, trial_ids: list[str]) -> dict[str, JobView]:
        """{trial id: a view of its job (status None when Redis has no job for it, or a record it cannot read)}."""
        with self.conn.pipeline(transaction=False) as pipe:
            for tid in trial_ids:
                read_job_owner(pipe, job_key(job_id(experiment, tid)))
            rows = pipe.execute()
        return {tid: JobView(*job_owner(row)) for tid, row in zip(trial_ids, rows)}

    def unqueued(self, experiment: str, trial_ids: list[str]) -> set[str]:
        """The trials among ``trial_ids`` whose job is QUEUED on this queue but no longer in its list: a worker took
        it (RQ moves it to the queue's intermediate list) and stopped or died before starting it. RQ leaves such
        a job there until a worker's maintenance fails it, ten minutes or more later. A job a worker is taking
        right now looks the same for a few milliseconds: the caller waits before it acts."""
        if not trial_ids:
            return set()
        ids = [job_id(experiment, tid) for tid in trial_ids]
        with self.conn.pipeline(transaction=False) as pipe:
            pipe.lrange(self.queue.key, 0, -1)
            for jid in ids:
                pipe.hmget(Job.key_for(jid), "status", "origin")
            listed, *rows = pipe.execute()
        listed = set(listed)
        return {tid for tid, jid, (status, origin) in zip(trial_ids, ids, rows)
                if status == JobStatus.QUEUED.value.encode() and origin == self.queue.name.encode()
                and jid.encode() not in listed}

    def quarantined_at(self, experiment: str, worker: str) -> str | None:
        """The failure time ``worker`` was last quarantined for (as ``mark_quarantined`` wrote it), else None."""
        value = self.conn.hget(quarantine_key(experiment), worker)
        return value.decode() if value is not None else None

    def mark_quarantined(self, experiment: str, worker: str, at: str) -> None:
        """Remember that ``worker`` was quarantined for its failure at ``at`` (so a restarted master does not shut
        down a worker restarted since under the same name)."""
        self.conn.hset(quarantine_key(experiment), worker, at)

    def heartbeats(self, names: list[str]) -> dict[str, float | None]:
        """{worker name: its last RQ heartbeat (unix time, the worker's clock), None when its key is gone}."""
        with self.conn.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hget(Worker.redis_worker_namespace_prefix + name, "last_heartbeat")
            beats = pipe.execute()
        return {n: utcparse(b.decode()).timestamp() if b else None for n, b in zip(names, beats)}

    def requeue(self, specs: list[TrialSpec], experiment_id: str = "") -> list[str]:
        """Put trials back in the queue whatever their jobs' state (a dead worker's job stays STARTED): in one
        transaction, delete the jobs and enqueue them afresh (they resume from their checkpoints), so a worker
        still running one never sees its job missing, only queued again. A pending stop request survives, so a
        trial being stopped still ends with its reason."""
        ids = [job_id(s.experiment, s.trial_id) for s in specs]
        stops = {s.trial_id: self.conn.get(stop_key(s.experiment, s.trial_id)) for s in specs}
        old_jobs = self._fetch(ids)
        with self.conn.pipeline() as pipe:
            for jid, job in zip(ids, old_jobs):
                if job is not None:
                    job.delete(pipeline=pipe)
                else:
                    pipe.delete(Job.key_for(jid))  # a fragment RQ could not read
            for jid in ids:  # a job taken but never started stays there; RQ would later fail its new run
                pipe.lrem(self.queue.intermediate_queue_key, 0, jid)
            for s in specs:
                reset_trial(pipe, s.experiment, s.trial_id, s.epochs)
                if stops[s.trial_id] is not None:
                    pipe.set(stop_key(s.experiment, s.trial_id), stops[s.trial_id], ex=KEY_TTL_SECONDS)
            self.queue.enqueue_many([self._job_data(jid, s, experiment_id) for jid, s in zip(ids, specs)],
                                    pipeline=pipe)
            pipe.execute()
        log.info("requeued %d trials on queue %s", len(specs), self.queue.name)
        return [s.trial_id for s in specs]

    def workers(self) -> list[dict[str, Any]]:
        """Live workers on this queue: name, state, current job (and trial), last heartbeat (unix time)."""
        out = []
        for w in Worker.all(queue=self.queue, serializer=JSONSerializer):
            current = w.get_current_job_id()
            trial = trial_of(current) if current else None
            out.append({
                "name": w.name, "state": w.get_state(), "hostname": w.hostname, "pid": w.pid,
                "current_job": current, "experiment": trial[0] if trial else None,
                "trial_id": trial[1] if trial else None,
                "last_heartbeat": w.last_heartbeat.timestamp() if w.last_heartbeat else None,
                "successful_jobs": w.successful_job_count, "failed_jobs": w.failed_job_count,
            })
        return out

    def counts(self, experiment: str) -> dict[str, int]:
        """How many of the experiment's jobs are queued, started, finished, failed and stopped."""
        prefix = _job_prefix(experiment)
        q = self.queue

        def ours(ids: list[str]) -> list[str]:
            return [i for i in ids if i.startswith(prefix)]

        failed_or_stopped = ours(q.failed_job_registry.get_job_ids(cleanup=False))
        with self.conn.pipeline(transaction=False) as pipe:
            for jid in failed_or_stopped:
                pipe.hget(Job.key_for(jid), "status")
            stopped = sum(status == JobStatus.STOPPED.value.encode() for status in pipe.execute())
        return {
            "queued": len(ours(q.get_job_ids())),
            "started": len(ours(q.started_job_registry.get_job_ids(cleanup=False))),
            "finished": len(ours(q.finished_job_registry.get_job_ids(cleanup=False))),
            "failed": len(failed_or_stopped) - stopped,
            "stopped": stopped,
        }
