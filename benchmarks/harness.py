"""Shared benchmark harness: real `worker start` processes on a real Redis, timed batches, cleanup."""
from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from master.dispatch import Dispatcher, connect, job_id, mask_url
from worker.spec import TrialSpec

DEFAULT_URL = "redis://127.0.0.1:6379/14"


@dataclass
class Batch:
    """One timed batch: wall seconds from the enqueue call to the last job finished, and per-job time."""

    trials: int
    workers: int
    wall: float
    in_job: list[float]  # RQ's ended_at - started_at of each job: the job function's own time

    @property
    def trials_per_sec(self) -> float:
        return self.trials / self.wall

    @property
    def in_job_ms(self) -> float:
        return 1000 * sum(self.in_job) / self.trials

    @property
    def overhead_ms(self) -> float:
        """Worker-slot time per trial not spent inside the job: queueing, RQ bookkeeping, idle gaps."""
        return 1000 * (self.wall * self.workers - sum(self.in_job)) / self.trials

    @property
    def utilization(self) -> float:
        return sum(self.in_job) / (self.wall * self.workers)


class Cluster:
    """N non-burst workers on one queue of a real Redis, started before timing and always stopped after."""

    def __init__(self, url: str, workers: int, storage: Path | None = None):
        self.url, self.count = url, workers
        self.conn = connect(url)
        self.tag = uuid.uuid4().hex[:10]
        self.queue = f"bench-{self.tag}"
        self._tmp = tempfile.TemporaryDirectory(prefix="hs-bench-")
        self.storage = storage or Path(self._tmp.name) / "storage"
        self.dispatcher = Dispatcher(self.conn, self.queue)
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Cluster:
        names = [f"bench-{self.tag}-{i}" for i in range(1, self.count + 1)]
        log = open(Path(self._tmp.name) / "workers.log", "ab")
        for name in names:
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "start", "--url", self.url, "--storage", str(self.storage),
                 "--queue", self.queue, "--name", name, "--threads", "1"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        log.close()
        deadline = time.monotonic() + 60
        while {w["name"] for w in self.dispatcher.workers()} != set(names):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"workers did not start; see {self._tmp.name}/workers.log")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        keys = list(self.conn.scan_iter(match=f"*{self.tag}*", count=1000))
        for i in range(0, len(keys), 1000):
            self.conn.delete(*keys[i:i + 1000])
        for registry in (b"rq:queues", b"rq:workers"):
            members = [m for m in self.conn.smembers(registry) if self.tag.encode() in m]
            if members:
                self.conn.srem(registry, *members)
        self._tmp.cleanup()

    def experiment(self, name: str) -> str:
        return f"{name}-{self.tag}"

    def run(self, specs: list[TrialSpec], poll: float = 0.02) -> Batch:
        """Enqueue ``specs`` (one experiment) and wait until every job has finished or failed."""
        experiment = specs[0].experiment
        started = time.perf_counter()
        self.dispatcher.enqueue(specs)
        while True:
            counts = self.dispatcher.counts(experiment)
            if counts["finished"] + counts["failed"] + counts["stopped"] >= len(specs):
                break
            time.sleep(poll)
        wall = time.perf_counter() - started
        jobs = Job.fetch_many([job_id(experiment, s.trial_id) for s in specs], connection=self.conn,
                              serializer=JSONSerializer)
        failed = [j for j in jobs if j.get_status(refresh=False) != JobStatus.FINISHED]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(specs)} trials did not finish; the first: "
                               f"{failed[0].latest_result().exc_string}")
        return Batch(len(specs), self.count, wall, [(j.ended_at - j.started_at).total_seconds() for j in jobs])

    def describe(self) -> str:
        version = self.conn.info("server")["redis_version"]
        return f"Redis {version} at {mask_url(self.url)}"
