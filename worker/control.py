"""The live control plane in Redis, the one place its keys and RQ's job fields are named (progress hashes, stop
requests, job ownership, connections), and in-process job interrupts."""
from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import threading
import time
from typing import Any, Iterator
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import redis
from rq.job import Job, JobStatus

from worker.states import TrialState

log = logging.getLogger(__name__)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_QUEUE = "hypersearch"
STOP_POLL_SECONDS = 0.2  # how often a running trial reads its stop key (honoured well within 1 s)
KEY_TTL_SECONDS = 7 * 24 * 3600  # progress and stop keys expire; shared storage is the record
ERROR_BACKOFF_SECONDS = 10.0  # after a failed stop poll (Redis gone), wait this long before the next one
STOP_GRACE_SECONDS = 5.0  # a job that ignores an in-process stop request this long gets StopJob raised in it
FRESH_REPLY_SECONDS = 1.0  # an ownership answer that took longer may predate a requeue (a partition delayed it)
EXPERIMENT_ID_META = "hs_experiment_id"  # the job meta field carrying its experiment's id (experiment.json)
REFUSED_FIELD = "refused"  # the progress field where a worker says why it handed a job back untouched
CONFIRM_RETRY_SECONDS = 1.0  # while Redis cannot confirm a trial is still ours, ask again this often


class ControlError(ConnectionError):
    """Redis cannot be reached or refused us; the message shows the URL with its password masked."""


def redis_url(url: str | None = None) -> str | None:
    """The Redis URL to use: ``url`` (a flag), else ``$REDIS_URL``, else None."""
    return url or os.environ.get("REDIS_URL") or None


def _password_span(url: str) -> tuple[int, int] | None:
    """Where ``url``'s user-info password is written: from the first ':' after '://' to the last '@', taken
    literally, so that a password holding an unencoded '/', '?' or '#' (where URL parsers end the host) is
    found whole; None without one."""
    start, end = url.find("://") + 3, url.rfind("@")
    colon = url.find(":", start, end) if 3 <= start < end else -1
    return (colon + 1, end) if colon >= 0 else None


def mask_url(url: str) -> str:
    """``url`` with its password (in the userinfo or a ``password=`` query option) replaced by ``***``."""
    span = _password_span(url)
    if span is not None:
        url = f"{url[:span[0]]}***{url[span[1]:]}"
    query = urlsplit(url).query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(k.lower() == "password" for k, _ in pairs):
        masked = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*")
        url = url.replace("?" + query, "?" + masked, 1)
    return url


def _secrets(url: str) -> list[str]:
    span = _password_span(url)
    found = [url[span[0]:span[1]], unquote(url[span[0]:span[1]])] if span is not None else []
    found += [v for k, v in parse_qsl(urlsplit(url).query) if k.lower() == "password"]
    return [s for s in found if s]


def open_redis(url: str) -> redis.Redis:
    """A client for ``url`` (redis://, rediss://, unix://; passwords allowed) that answered PING.

    Raises ControlError "cannot reach Redis at <masked url>: <why>"; the password never appears in it, also
    when it holds characters that should have been percent-encoded (such a URL is refused before use).
    """
    masked = mask_url(url)
    span = _password_span(url)
    if span is not None and url[span[0]:span[1]] != urlsplit(url).password:
        raise ControlError(f"cannot use Redis URL {masked}: its password holds a '/', '?', '#' or '@' that is not "
                           "percent-encoded (write them %2F, %3F, %23, %40)")
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5)
        client.ping()
    except (redis.RedisError, ValueError, OSError) as exc:
        why = str(exc) or type(exc).__name__
        for secret in _secrets(url):
            why = why.replace(secret, "***")
        raise ControlError(f"cannot reach Redis at {masked}: {why}") from None
    return client


def progress_key(experiment: str, trial_id: str) -> str:
    return f"hs:{experiment}:progress:{trial_id}"


def stop_key(experiment: str, trial_id: str) -> str:
    return f"hs:{experiment}:stop:{trial_id}"


def request_stop(conn: redis.Redis, experiment: str, trial_id: str, reason: str,
                 state: TrialState = TrialState.KILLED) -> None:
    """Ask the worker running (or about to run) a trial to stop it; it ends in ``state`` (KILLED or DIVERGED)
    and the reason ends up in its result. The key holds the reason (KILLED), or a JSON object naming the state."""
    conn.set(stop_key(experiment, trial_id), stop_request(reason, state), ex=KEY_TTL_SECONDS)


def stop_request(reason: str, state: TrialState = TrialState.KILLED) -> str:
    """A stop request as its key holds it: the reason (KILLED), or a JSON object naming the state (``stopped_as``
    reads both). QUEUED hands the trial back (its worker is shutting down): it resumes elsewhere."""
    reason = reason or "stopped by user"
    if state in (TrialState.DIVERGED, TrialState.QUEUED):
        return json.dumps({"state": state.value, "reason": reason})
    if state is not TrialState.KILLED:
        raise ValueError(f"a stop request ends a trial KILLED or DIVERGED, not {state.value} (QUEUED hands it back)")
    return reason


def stopped_as(request: str) -> tuple[TrialState, str]:
    """The state and reason a trial stopped on ``request`` (a stop key's value, or a plain reason) ends with."""
    try:
        decoded = json.loads(request)
        return TrialState(decoded["state"]), str(decoded["reason"])
    except (ValueError, TypeError, KeyError):  # a plain reason: KILLED
        return TrialState.KILLED, request


def reset_trial(conn: Any, experiment: str, trial_id: str, epochs: int) -> None:
    """Mark a trial QUEUED and drop any old stop request (``conn`` may be a pipeline)."""
    key = progress_key(experiment, trial_id)
    conn.delete(key, stop_key(experiment, trial_id))
    conn.hset(key, mapping=_encode({"state": TrialState.QUEUED.value, "epoch": 0, "epochs": epochs,
                                    "updated": time.time()}))
    conn.expire(key, KEY_TTL_SECONDS)


def _encode(fields: dict[str, Any]) -> dict[str, str]:
    return {k: json.dumps(v, allow_nan=True) for k, v in fields.items()}


def _decode(raw: dict[bytes, bytes]) -> dict[str, Any]:
    out = {}
    for k, v in raw.items():
        text = v.decode(errors="replace")
        try:
            out[k.decode(errors="replace")] = json.loads(text)
        except ValueError:
            out[k.decode(errors="replace")] = text  # written by something else: keep the text
    return out


def read_progress(conn: redis.Redis, experiment: str) -> dict[str, dict[str, Any]]:
    """{trial id: progress fields} for every trial of ``experiment`` that has a progress hash."""
    prefix = progress_key(experiment, "")
    keys = sorted(conn.scan_iter(match=prefix + "*", count=1000))
    with conn.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hgetall(key)
        values = pipe.execute()
    return {key.decode()[len(prefix):]: _decode(raw) for key, raw in zip(keys, values) if raw}


class StopJob(BaseException):
    """Raised inside a job's thread when it did not stop cooperatively within the grace period."""

    def __init__(self, *args: object):
        super().__init__(*(args or ("the job did not stop within the grace period and was interrupted",)))


class TrialLost(BaseException):
    """The trial's job is no longer this worker's (the master requeued it while the worker was cut off, or Redis
    lost it): the run must end without writing anything more to shared storage or to the job."""


def job_key(rq_job_id: str) -> str:
    """The Redis key of an RQ job's hash."""
    return Job.key_for(rq_job_id)


def touch_job(conn: redis.Redis, key: str, field: str, value: str) -> None:
    """Set one field of the RQ job hash at ``key`` only while that hash exists (checked and set in one
    transaction): a worker must never recreate a job key that Redis lost or the master deleted, as RQ's
    heartbeat would (a hash holding that one field, which RQ cannot read back)."""
    with conn.pipeline() as pipe:
        try:
            pipe.watch(key)
            if pipe.exists(key):
                pipe.multi()
                pipe.hset(key, field, value)
                pipe.execute()
        except redis.WatchError:
            pass  # the job changed meanwhile (the master requeued it): not ours to stamp


def job_record_key(conn: Any, key: str) -> Any:
    """Queue a check that the hash at ``key`` is a whole RQ job record (it holds the job's data), not a
    fragment left by a heartbeat; on a pipeline, its slot in the results."""
    return conn.hexists(key, "data")


def read_job_owner(conn: Any, key: str) -> Any:
    """Queue a read of (status, worker name) of the RQ job hash at ``key`` on ``conn`` (a client: the answer;
    a pipeline: its slot in the pipeline's results). ``job_owner`` decodes the answer."""
    return conn.hmget(key, "status", "worker_name")


def job_owner(fields: list[bytes | None]) -> tuple[str | None, str | None]:
    """(RQ status, worker name) from ``read_job_owner``'s answer; (None, None) when the job is gone."""
    status, owner = (f.decode(errors="replace") or None if f is not None else None for f in fields)
    return status, owner


def job_owner_problem(fields: list[bytes | None], worker_name: str) -> str | None:
    """Why a job whose (status, worker_name) are ``fields`` is not being run by ``worker_name``; None if it is."""
    status, owner = job_owner(fields)
    if status is None:
        return "its job is gone from Redis"
    if status != JobStatus.STARTED.value or owner != worker_name:
        return f"its job is now {status}" + (f" on worker {owner}" if owner and owner != worker_name else "")
    return None


class JobInterrupt:
    """A stop request for the job running in this process: a reason the trainer polls, then StopJob raised
    asynchronously in the job's thread if it is still running ``grace`` seconds later."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # re-entrant: a signal handler may request a stop while the thread holds it
        self._thread: int | None = None
        self._timer: threading.Timer | None = None
        self.reason: str | None = None
        self.handed_back = False  # the job's trial was handed back QUEUED on this request: requeue the job

    def clear(self) -> None:
        """Forget any request (a new job is about to start)."""
        with self._lock:
            self.reason = None
            self.handed_back = False
            self._cancel_timer()

    def hands_back(self) -> bool:
        """Whether the request asks to hand the trial back to the queue (its worker is shutting down)."""
        return self.reason is not None and stopped_as(self.reason)[0] is TrialState.QUEUED

    @contextlib.contextmanager
    def running(self) -> Iterator[JobInterrupt]:
        """Mark the calling thread as the one running the job while the block runs."""
        with self._lock:
            self._thread = threading.get_ident()
        try:
            yield self
        finally:
            with self._lock:
                self._thread = None
                self._cancel_timer()

    def request(self, reason: str, grace: float = STOP_GRACE_SECONDS) -> None:
        """Ask the running job to stop now; interrupt it with StopJob if it still runs after ``grace`` s."""
        with self._lock:
            self.reason = self.reason or reason
            if self._timer is None:
                self._timer = threading.Timer(grace, self._interrupt)
                self._timer.daemon = True
                self._timer.start()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _interrupt(self) -> None:
        with self._lock:
            self._timer = None
            if self._thread is None:
                return
            log.warning("job did not stop within the grace period: raising StopJob in its thread")
            done = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread), ctypes.py_object(StopJob))
            if done != 1:  # 0: the thread is gone; >1 cannot happen for one thread id, but undo it as CPython asks
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread), None)


class RedisControl:
    """A running trial's view of the control plane: throttled stop checks and progress reports."""

    def __init__(self, conn: redis.Redis, experiment: str, trial_id: str, worker_name: str, *,
                 interrupt: JobInterrupt | None = None, poll_seconds: float = STOP_POLL_SECONDS,
                 job_key: str | None = None):
        self.conn = conn
        self.worker_name = worker_name
        self.interrupt = interrupt
        self.poll_seconds = poll_seconds
        self.trial_id = trial_id
        self.job_key = job_key  # the RQ job running the trial: checked to still be ours (None: not checked)
        self._stop_key = stop_key(experiment, trial_id)
        self._progress_key = progress_key(experiment, trial_id)
        self._next_poll = 0.0
        self._reason: str | None = None

    def should_stop(self) -> str | None:
        """The reason of a stop request, or None; reads Redis at most every ``poll_seconds``. Raises TrialLost
        when the trial's job is no longer ours (read in the same round trip)."""
        if self._reason is None and self.interrupt is not None:
            self._reason = self.interrupt.reason
        if self._reason is not None:
            return self._reason
        now = time.monotonic()
        if now < self._next_poll:
            return None
        self._next_poll = now + self.poll_seconds
        try:
            with self.conn.pipeline(transaction=False) as pipe:
                pipe.get(self._stop_key)
                if self.job_key is not None:
                    read_job_owner(pipe, self.job_key)
                value, *job = pipe.execute()
        except redis.RedisError as exc:
            log.warning("cannot read the stop request %s (next try in %g s): %s", self._stop_key,
                        ERROR_BACKOFF_SECONDS, exc)
            self._next_poll = now + ERROR_BACKOFF_SECONDS  # do not stall training on every poll
            return None
        if job:
            self._check_owner(job[0])
        if value is not None:
            self._reason = value.decode(errors="replace") or "stopped by user"  # the request, read by stopped_as
        return self._reason

    def confirm(self) -> None:
        """Before writing to shared storage: make sure the trial's job is still ours, by an answer fresh from
        Redis (one delayed over FRESH_REPLY_SECONDS, e.g. by a partition, may predate a requeue, so it is asked
        again), waiting while Redis cannot be reached. Raises TrialLost when the job is no longer ours."""
        if self.job_key is None:
            return
        unreachable_since = None
        while True:
            asked = time.monotonic()
            try:
                fields = read_job_owner(self.conn, self.job_key)
            except redis.RedisError as exc:
                if unreachable_since is None:
                    unreachable_since = asked
                    log.warning("trial %s: cannot confirm with Redis that it is still ours; holding its writes "
                                "until Redis answers: %s", self.trial_id, exc)
                time.sleep(CONFIRM_RETRY_SECONDS)
                continue
            if time.monotonic() - asked <= FRESH_REPLY_SECONDS:
                break
        if unreachable_since is not None:
            log.info("trial %s: Redis answers again after %.0f s", self.trial_id, time.monotonic() - unreachable_since)
        self._check_owner(fields)

    def _check_owner(self, fields: list[bytes | None]) -> None:
        problem = job_owner_problem(fields, self.worker_name)
        if problem is not None:
            raise TrialLost(f"trial {self.trial_id}: no longer this worker's ({problem}; the master requeues the "
                            "trials of workers it cannot hear from): stopped without writing more")

    def report(self, fields: dict[str, Any]) -> None:
        """Merge ``fields`` into the trial's progress hash (with worker and updated); Redis errors only warn."""
        mapping = _encode({**fields, "worker": self.worker_name, "updated": time.time()})
        try:
            with self.conn.pipeline(transaction=False) as pipe:
                pipe.hset(self._progress_key, mapping=mapping)
                pipe.expire(self._progress_key, KEY_TTL_SECONDS)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("cannot publish progress to %s: %s", self._progress_key, exc)
