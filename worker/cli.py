"""The ``worker`` command: run an in-process RQ worker that trains trials taken from the queue."""
from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

import click

from worker.control import DEFAULT_QUEUE, DEFAULT_REDIS_URL, ControlError, mask_url, open_redis, redis_url
from worker.jobs import TrialWorker
from worker.store import StorageError, probe_writable, storage_root
from worker.threads import use_threads

log = logging.getLogger(__name__)


def _fail(message: str) -> None:
    click.echo(f"worker: {message}", err=True)
    sys.exit(2)


def _writable_storage(path: str | None) -> Path:
    """The absolute storage root, created if missing; exits 2 with one line when it cannot be written."""
    root = storage_root(path).resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe_writable(root)
    except OSError as exc:  # StorageError says it in full
        _fail(str(exc) if isinstance(exc, StorageError) else f"storage {root}: not writable ({exc.strerror or exc})")
    return root


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train hypersearch trials taken from a Redis queue."""


@main.command()
@click.option("--url", help=f"Redis URL (redis://, rediss://; default $REDIS_URL, else {DEFAULT_REDIS_URL}).")
@click.option("--storage", help="Shared storage root (default $HYPERSEARCH_STORAGE, else ./checkpoints).")
@click.option("--queue", default=DEFAULT_QUEUE, show_default=True, help="Queue to take trials from.")
@click.option("--name", help="Worker name, unique among live workers (default HOST.PID).")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="Cores this worker trains on: BLAS threads, and for ConvNets the minibatch split over as many "
                   "threads (N workers x 1 thread use N cores).")
@click.option("--burst", is_flag=True, help="Quit when the queue is empty.")
def start(url: str | None, storage: str | None, queue: str, name: str | None, threads: int, burst: bool) -> None:
    """Run a worker: one trial at a time, in this process; Ctrl-C / SIGTERM hands the running trial back to the
    queue at its next batch (it resumes from its last checkpoint elsewhere), then quits."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    url = redis_url(url) or DEFAULT_REDIS_URL
    root = _writable_storage(storage)
    os.environ["HYPERSEARCH_STORAGE"] = str(root)  # what worker.jobs.train_trial reads
    try:
        conn = open_redis(url)
    except ControlError as exc:
        _fail(str(exc))
    name = name or f"{socket.gethostname().split('.')[0]}.{os.getpid()}"
    use_threads(threads)
    try:
        worker = TrialWorker([queue], connection=conn, name=name)
    except Exception as exc:  # rq validates the connection and the name while building the worker
        _fail(f"cannot start a worker on {mask_url(url)}: {exc}")
    log.info("worker %s: queue %s on %s, storage %s, %d thread(s)", name, queue, mask_url(url), root, threads)
    try:
        worker.work(burst=burst, logging_level="INFO")
    except ValueError as exc:  # e.g. "There exists an active worker named ... already"
        _fail(str(exc))
    if worker.refused:  # its storage is not the experiment's: the job went back to the queue untouched
        _fail(f"{worker.refused} (the job went back to the queue; not taking any more)")
    if not burst and not worker.stop_asked:  # RQ logs an unexpected error (or a Redis timeout) and returns
        click.echo(f"worker: {name} quit on an unexpected error (logged above); exit status 1 so that a "
                   "supervisor (systemd Restart=on-failure, Kubernetes) starts it again", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
