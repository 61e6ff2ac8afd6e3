"""The one RQ entry point, ``train_trial``, and the in-process allow-listing RQ worker that runs it."""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import threading
import time
from typing import Any, Iterator

import redis
from rq import get_current_job
from rq.exceptions import DeserializationError
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.utils import utcformat
from rq.worker import BaseWorker, SimpleWorker

from worker.control import (EXPERIMENT_ID_META, REFUSED_FIELD, STOP_GRACE_SECONDS, JobInterrupt, RedisControl, StopJob,
                            TrialLost, job_owner_problem, read_job_owner, stop_request, touch_job)
from worker.spec import SpecError, TrialSpec
from worker.states import TrialState
from worker.store import ExperimentStore, storage_root
from worker.trainer import PAUSE_SECONDS, persist, run_trial

log = logging.getLogger(__name__)

ALLOWED_FUNCTIONS = frozenset({"worker.jobs.train_trial"})
STOP_COMMAND_REASON = "stopped by user (RQ stop-job command)"
HEARTBEAT_SECONDS = 10  # RQ worker and job heartbeats while a job runs (a silent worker's key expires in ~70 s)
PUBSUB_WAKE_SECONDS = 0.5  # the command listener checks this often whether the worker is quitting
HEARTBEAT_RETRY_SECONDS = 1.0  # after a failed heartbeat (Redis restarting, a network blip), try again this soon
INTERRUPT = JobInterrupt()  # the stop request for the job this process runs (one at a time)


def train_trial(spec: dict[str, Any]) -> dict[str, Any] | None:
    """Run one trial inside an RQ worker; storage from the worker (``--storage`` / $HYPERSEARCH_STORAGE).
    None when the trial was taken from this worker while it ran (its new run owns the result)."""
    trial = TrialSpec.from_dict(spec)
    job = get_current_job()
    if job is None:
        raise RuntimeError("train_trial runs inside an RQ worker (worker start), not on its own")
    control = RedisControl(job.connection, trial.experiment, trial.trial_id, job.worker_name, interrupt=INTERRUPT,
                           job_key=job.key)
    store = persist(ExperimentStore(storage_root(), trial.experiment).ensure)
    try:
        with INTERRUPT.running():
            result = run_trial(trial, store, control, job.worker_name)
    except TrialLost as exc:
        log.warning("%s", exc)
        return None
    except StopJob:
        INTERRUPT.handed_back = INTERRUPT.hands_back()  # recorded QUEUED by the trainer on its way out
        raise
    if result.state is TrialState.QUEUED:
        INTERRUPT.handed_back = True
        return result.to_dict()
    if INTERRUPT.reason is not None and result.state is TrialState.KILLED:
        raise StopJob(result.reason)  # RQ's stop-job command: the job ends STOPPED, as with RQ's forking worker
    return result.to_dict()


@contextlib.contextmanager
def out_of_memory_warns(what: str) -> Iterator[None]:
    """Turn Redis running out of memory (``maxmemory`` with noeviction) into one warning saying ``what`` is
    skipped: the worker lives on, and pauses before its next job until Redis accepts writes again."""
    try:
        yield
    except (redis.OutOfMemoryError, redis.exceptions.ExecAbortError) as exc:
        log.warning("Redis out of memory: %s (%s)", what, exc)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return pid > 0


def refusal(job: Job, allowed: frozenset[str] = ALLOWED_FUNCTIONS) -> str | None:
    """Why ``job`` must not run, read from its JSON payload without importing anything; None if it may."""
    try:
        func_name, instance = job.func_name, job.instance
    except DeserializationError:
        return "refused: the job's data is not a JSON job payload (pickled or corrupt); it was not unpickled"
    if instance is not None:
        return "refused: jobs that call a method on an instance are not allowed"
    # RQ imports callbacks by name too; it keeps their names in these attributes (rq 2.x and 3.x)
    callbacks = [getattr(job, f"_{kind}_callback_name", None) for kind in ("success", "failure", "stopped")]
    for name in [func_name, *callbacks]:
        if name is not None and name not in allowed:
            return f"refused: {name!r} is not an allowed job function"
    return None


class TrialJob(Job):
    """An RQ job whose heartbeat never recreates its hash: RQ's sets ``last_heartbeat`` whether or not the hash
    exists, so after Redis restarted empty a worker left a key the master could neither read nor replace."""

    def heartbeat(self, timestamp: Any, ttl: int, pipeline: Any = None, xx: bool = False) -> None:
        """Stamp the job's heartbeat while its hash exists. Inside RQ's transactions (taking a job, the periodic
        heartbeat) nothing can be checked first, so the hash is left alone there (RQ 3 reads a running job's
        liveness from its execution and its worker, never from this field) and RQ gets the field count in place
        of HSET's answer: RQ deletes the key when that answer is 1, which only a one-field fragment gives."""
        self.last_heartbeat = timestamp
        if pipeline is not None:
            pipeline.hlen(self.key)
        else:
            touch_job(self.connection, self.key, "last_heartbeat", utcformat(timestamp))


class _Heartbeat(threading.Thread):
    """Keeps the worker's and the running job's RQ heartbeats fresh while the main thread runs the job.

    One long-lived thread per worker (starting a thread per job costs about a millisecond on a busy machine).
    """

    def __init__(self, worker: TrialWorker):
        super().__init__(name=f"heartbeat-{worker.name}", daemon=True)
        self.worker = worker
        self.lock = threading.Lock()
        self.current: tuple[Job, Any] | None = None

    def run(self) -> None:
        pause = self.worker.job_monitoring_interval
        while True:
            time.sleep(pause)
            pause = self.worker.job_monitoring_interval
            with self.lock:
                if self.current is None:
                    continue
                try:
                    self.worker.maintain_heartbeats(*self.current)
                except redis.RedisError as exc:
                    pause = HEARTBEAT_RETRY_SECONDS  # a blip must not silence us for a whole interval
                    log.warning("heartbeat for job %s failed (next try in %g s): %s", self.current[0].id, pause, exc)

    def watch(self, job: Job | None, execution: Any = None) -> None:
        with self.lock:
            self.current = None if job is None else (job, execution)


class TrialWorker(SimpleWorker):
    """An RQ worker that runs allow-listed jobs in its own process (no fork per job) with the JSON serializer.

    Stopping still works: the trainer polls its stop key between batches (the job then ends FINISHED with a
    KILLED result), and RQ's stop-job command, which a plain SimpleWorker ignores, sets an in-process stop
    request the trainer sees at its next batch; a job still running ``stop_grace`` seconds later gets StopJob
    raised in its thread. After a stop-job command the RQ job ends STOPPED, as with RQ's forking worker.
    Job timeouts use RQ's SIGALRM death penalty, which works in the main thread where the job runs; a
    heartbeat thread keeps the worker visible during long jobs.
    """

    job_class = TrialJob
    get_heartbeat_ttl = BaseWorker.get_heartbeat_ttl  # heartbeats arrive while a job runs, as with forking
    log_result_lifespan = False  # the master sets how long results live; no line per job about it

    def __init__(self, queues: Any, *, allowed: frozenset[str] = ALLOWED_FUNCTIONS,
                 stop_grace: float = STOP_GRACE_SECONDS, **kwargs: Any):
        if kwargs.get("serializer", JSONSerializer) is not JSONSerializer:
            raise ValueError("TrialWorker only speaks JSON (no pickle on the wire)")
        kwargs["serializer"] = JSONSerializer
        kwargs.setdefault("job_monitoring_interval", HEARTBEAT_SECONDS)
        super().__init__(queues, **kwargs)
        self.allowed = allowed
        self.stop_grace = stop_grace
        self.stop_asked = False  # a signal or RQ's shutdown command asked this worker to quit
        self.refused: str | None = None  # why it quit handing a job back (its storage is not the experiment's)
        self._heartbeat: _Heartbeat | None = None
        self._full_beat_at = 0.0

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        """RQ registers the worker (visible to ``Worker.all``, so to supervisors and to the master's shutdown
        command) before it installs its SIGINT / SIGTERM handlers; a signal in between would kill the process
        (exit -15). Until RQ's handlers take over, a signal asks the work loop to end before its first job."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._stop_before_work)
        super().bootstrap(*args, **kwargs)

    def _stop_before_work(self, signum: Any, frame: Any) -> None:
        log.info("worker %s: asked to quit while starting (signal %s)", self.name, signum)
        self.stop_asked = self._stop_requested = True

    def subscribe(self) -> None:
        """RQ's command channel (stop-job, shutdown), listened to by a thread that wakes every
        PUBSUB_WAKE_SECONDS instead of RQ's 60: redis-py 8.2's ``PubSubWorkerThread.stop()`` joins that thread,
        so RQ's ``unsubscribe()`` on the way out waited up to a minute for its blocked read (rq 3.0 with
        redis-py 8.1 did not wait). An idle wake-up is a local poll of the socket, no round trip to Redis."""
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(sleep_time=PUBSUB_WAKE_SECONDS, daemon=True,
                                                       exception_handler=self._pubsub_exception_handler)

    def request_stop(self, signum: Any, frame: Any) -> None:
        """SIGINT / SIGTERM (RQ's shutdown command sends SIGINT): quit after the running trial's next batch, which
        hands the trial back QUEUED (it resumes from its last checkpoint on another worker)."""
        if not self.stop_asked:
            INTERRUPT.request(stop_request(f"worker {self.name} shutting down", TrialState.QUEUED), self.stop_grace)
        self.stop_asked = True
        super().request_stop(signum, frame)

    def execute_job(self, job: Job, queue: Queue) -> None:
        self._stopped_job_id = None
        INTERRUPT.clear()
        with out_of_memory_warns(f"job {job.id}: not recording its end"):  # its outcome is in storage
            super().execute_job(job, queue)

    def check_for_suspension(self, burst: bool) -> None:
        with out_of_memory_warns("no heartbeat"):  # RQ beats in the same round trip
            super().check_for_suspension(burst)

    def run_maintenance_tasks(self) -> None:
        with out_of_memory_warns("skipping RQ's registry maintenance"):
            super().run_maintenance_tasks()

    def teardown(self) -> None:
        with out_of_memory_warns(f"worker {self.name}: not unregistering (a restart under this name clears it)"):
            super().teardown()

    def perform_job(self, job: Job, queue: Queue, execution: Any) -> bool:
        elsewhere = self.storage_mismatch(job)
        if elsewhere is not None:  # nothing of the trial is touched: the job goes back for a worker that can run it
            log.warning("job %s handed back: %s", job.id, elsewhere)
            self._push_front(job, queue, execution)
            spec = job.args[0]
            RedisControl(self.connection, spec["experiment"], spec["trial_id"], self.name).report(
                {REFUSED_FIELD: elsewhere})
            self.refused, self._stop_requested = elsewhere, True
            return False
        reason = refusal(job, self.allowed)
        if reason is not None:
            log.warning("job %s %s", job.id, reason)
            job.retries_left, job.webhooks = None, []  # a refused job is neither retried nor announced
            super().handle_job_failure(job, queue, exc_string=reason, execution=execution)  # it never started
            return False
        if self._heartbeat is None:
            self._heartbeat = _Heartbeat(self)
            self._heartbeat.start()
        self._heartbeat.watch(job, execution)
        try:
            return super().perform_job(job, queue, execution)
        except (redis.ConnectionError, redis.OutOfMemoryError) as exc:
            # Redis went away (or is out of memory) while RQ recorded the job's end. The trial's outcome is already
            # in shared storage (the record); the master reads it there, and this worker lives on rather than quit
            # (RQ would let the error end its work loop).
            log.warning("job %s: could not record its end in Redis (%s); its outcome is in storage", job.id, exc)
            return False
        finally:
            self._heartbeat.watch(None)

    def register_birth(self) -> None:
        """RQ's registration, after removing one left by this worker's previous process (same host, its process
        gone: it died without unregistering, e.g. while Redis was out of memory); a live namesake is refused in
        one line saying how long its registration lasts if it is gone."""
        death, host, pid = self.connection.hmget(self.key, "death", "hostname", "pid")
        if host is not None and death is None:
            host, pid = host.decode(errors="replace"), int(pid or 0)
            if host == self.hostname and (pid == os.getpid() or not pid_alive(pid)):
                log.info("worker %s: removing the registration its previous process (pid %d) left", self.name, pid)
                self.connection.delete(self.key)
            else:
                raise ValueError(f"a worker named {self.name!r} is registered (host {host}, pid {pid}); give another "
                                 f"--name, or, if it is gone, wait {max(self.connection.ttl(self.key), 0)} s for its "
                                 f"registration to expire")
        super().register_birth()

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        """RQ's dequeue, once Redis accepts writes: while it is out of memory, taking a job would pop it and then
        fail to record it started (the job lost), so the worker pauses, saying why in one line, and tries again."""
        for attempt in itertools.count():
            try:
                self.connection.set(f"hs:writable:{self.name}", 1, ex=60)
                break
            except redis.OutOfMemoryError as exc:
                pause = PAUSE_SECONDS[min(attempt, len(PAUSE_SECONDS) - 1)]
                log.warning("worker %s: Redis out of memory (%s): paused, next try in %g s", self.name, exc, pause)
                if self.stop_asked or self._stop_requested:
                    return None
                time.sleep(pause)
        return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)

    def handle_job_success(self, job: Job, queue: Queue, *args: Any, **kwargs: Any) -> None:
        if not self._taken(job, kwargs.get("execution")) and not self._hand_back(job, queue, kwargs.get("execution")):
            super().handle_job_success(job, queue, *args, **kwargs)

    def handle_job_failure(self, job: Job, queue: Queue, *args: Any, **kwargs: Any) -> None:
        if not self._taken(job, kwargs.get("execution")) and not self._hand_back(job, queue, kwargs.get("execution")):
            super().handle_job_failure(job, queue, *args, **kwargs)

    def _hand_back(self, job: Job, queue: Queue, execution: Any) -> bool:
        """Put the job of a trial handed back on shutdown (recorded QUEUED) at the front of its queue, so another
        worker resumes it from its last checkpoint with no master involved; False when it was not handed back."""
        if not INTERRUPT.handed_back:
            return False
        self._push_front(job, queue, execution)
        log.info("job %s: handed back to queue %s (worker %s shutting down)", job.id, queue.name, self.name)
        return True

    def _push_front(self, job: Job, queue: Queue, execution: Any) -> None:
        """Put a job this worker took back at the front of its queue, QUEUED, with no trace of this run."""
        with self.connection.pipeline() as pipe:
            self.cleanup_execution(job, pipe, execution)
            job.set_status(JobStatus.QUEUED, pipeline=pipe)
            pipe.lrem(queue.intermediate_queue_key, 1, job.id)  # else RQ's maintenance later fails the job
            queue.push_job_id(job.id, pipeline=pipe, at_front=True)
            pipe.execute()

    def storage_mismatch(self, job: Job) -> str | None:
        """Why this worker's storage is not that of the job's experiment (the job carries the experiment's id,
        from experiment.json, and this storage has no such experiment or another one of that name); None when
        it is, or when the job carries no id (enqueued around ``master launch``), or is not a trial job."""
        try:
            spec, carried = job.args[0], (job.meta or {}).get(EXPERIMENT_ID_META)
            store = ExperimentStore(storage_root(), spec["experiment"])
        except (DeserializationError, IndexError, KeyError, TypeError, SpecError):
            return None
        if not carried:
            return None
        record = store.read_experiment()
        if record is None:
            return (f"worker {self.name}'s storage {store.root} has no experiment {store.experiment}: is --storage the "
                    f"shared one?")
        if record.id and record.id != carried:
            return (f"worker {self.name}'s storage {store.root} holds another experiment named {store.experiment} "
                    f"(id {record.id}, not {carried}): is --storage the shared one?")
        return None

    def _taken(self, job: Job, execution: Any) -> bool:
        """Whether ``job`` was taken from this worker while it ran (the master requeued it when it could not hear
        from us): then the job's state in Redis belongs to its new run, and only our execution record goes."""
        problem = job_owner_problem(read_job_owner(self.connection, job.key), self.name)
        if problem is None:
            return False
        log.warning("job %s: not recording its end, it is no longer ours (%s)", job.id, problem)
        with self.connection.pipeline() as pipe:
            self.cleanup_execution(job, pipe, execution)
            pipe.execute()
        return True

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ's worker heartbeat in one round trip instead of three, and skipped within a second of the last
        full-TTL one: RQ sends three around every job (after it, before and after the next dequeue)."""
        full_ttl = timeout is None
        if pipeline is not None:
            super().heartbeat(timeout, pipeline)
        elif full_ttl and time.monotonic() - self._full_beat_at < 1.0:
            return  # the key was just given its full TTL (minutes); a shorter one always resets this
        else:
            with self.connection.pipeline(transaction=False) as pipe, out_of_memory_warns("no heartbeat"):
                super().heartbeat(timeout, pipe)
                pipe.execute()
        self._full_beat_at = time.monotonic() if full_ttl else 0.0

    def kill_horse(self, sig: Any = None) -> None:
        """RQ's stop-job / stop-execution commands land here (from the pub/sub thread): ask the job to stop."""
        if self.get_current_job_id() is not None:
            log.info("stop requested for job %s", self.get_current_job_id())
            INTERRUPT.request(STOP_COMMAND_REASON, self.stop_grace)
