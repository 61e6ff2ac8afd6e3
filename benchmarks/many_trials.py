"""10,000 trivial trials through a real Redis and 2 workers: throughput, Redis memory per trial, the watching
master's CPU, and `master status` / `master report` latency at that size.

Usage: python benchmarks/many_trials.py [--trials 10000] [--workers 2] [--follow watch|launch] [--markdown]

Everything runs as a user would run it: a private redis-server on a free port (so INFO's used_memory is ours
alone), `master launch --no-wait` (plan, record, enqueue), `worker start` processes (benchmarks/harness.py),
`master watch` (or `master launch --wait`) following the stage to its end, `master status` midway through the
stage and after it, then `master report`, each in a fresh process.
A trial is the cheapest valid one (benchmarks/dispatch_overhead.py: the 2-D spiral, a 4-unit MLP, one epoch of
one minibatch), so the figures are the system's own overhead. CPU times are each process's own (wait4).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from harness import Cluster

from master.embedded import EmbeddedRedis
from worker.store import ExperimentStore

EXPERIMENT = "many"
CONFIG = """\
[experiment]
name = "{name}"
dataset = "spiral"
seed = 0
keep = 1

[model]
hidden = [4]

[solver]
batch_size = 256
train_eval_samples = 16

[stages.coarse]
epochs = 1
trials = {trials}
prune = "none"

[space.solver]
lr = {{ dist = "loguniform", low = 1e-3, high = 1e-1 }}
"""


class Master:
    """One ``master ...`` process: started now, its wall time and its own CPU time (wait4) taken when it ends."""

    def __init__(self, *args: str, url: str | None, storage: Path, queue: str):
        self.args = args
        command = [sys.executable, "-m", "master.cli", *args, "--storage", str(storage)]
        if url is not None:
            command += ["--url", url, "--queue", queue]
        self.output = tempfile.TemporaryFile()  # not a pipe: a chatty master must never block on it
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(command, stdout=self.output, stderr=subprocess.STDOUT,
                                     env={**os.environ, "COLUMNS": "120"})

    def finish(self) -> tuple[float, float]:
        """(wall s, CPU s of this process alone) once it has ended; raises when it failed."""
        _, status, usage = os.wait4(self.proc.pid, 0)
        wall = time.perf_counter() - self.started
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        if self.proc.returncode != 0:
            self.output.seek(0)
            raise RuntimeError(f"master {' '.join(self.args)} exited {self.proc.returncode}:\n"
                               f"{self.output.read().decode(errors='replace')}")
        return wall, usage.ru_utime + usage.ru_stime


def master(*args: str, url: str | None, storage: Path, queue: str) -> tuple[float, float]:
    """Run ``master ARGS`` to its end: (wall s, CPU s)."""
    return Master(*args, url=url, storage=storage, queue=queue).finish()


def used_memory(conn: redis.Redis) -> int:
    return int(conn.info("memory")["used_memory"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="runs of `master status` / `master report` timed")
    parser.add_argument("--follow", choices=("watch", "launch"), default="watch",
                        help="the master that follows the stage: `master watch`, or `master launch --wait`")
    parser.add_argument("--redis-server", default=None, metavar="PATH",
                        help="redis-server binary (default: the embedded Redis's choice, master.embedded)")
    parser.add_argument("--markdown", action="store_true", help="also print the RESULTS.md table row")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="hs-many-") as tmp:
        tmp_path = Path(tmp)
        storage = tmp_path / "storage"
        storage.mkdir()
        config = tmp_path / "many.toml"
        config.write_text(CONFIG.format(name=EXPERIMENT, trials=args.trials))
        with EmbeddedRedis(tmp_path / "redis", binary=args.redis_server) as server:
            conn = redis.Redis.from_url(server.url)
            version = conn.info("server")["redis_version"]
            with Cluster(server.url, args.workers, storage) as cluster:
                where = dict(url=server.url, storage=storage, queue=cluster.queue)
                idle = used_memory(conn)
                launch_wall, launch_cpu = master("launch", "--config", str(config), "--no-wait", **where)
                queued = used_memory(conn)
                follow = ["watch", "--experiment", EXPERIMENT] if args.follow == "watch" else \
                    ["launch", "--config", str(config), "--wait"]  # enqueues nothing more, follows to the end
                watcher = Master(*follow, **where)
                while conn.llen(f"rq:queue:{cluster.queue}") > args.trials // 2 and watcher.proc.poll() is None:
                    time.sleep(0.5)
                midway = master("status", "--experiment", EXPERIMENT, **where)[0]  # while the stage runs
                watch_wall, watch_cpu = watcher.finish()
                done = used_memory(conn)
                store = ExperimentStore(storage, EXPERIMENT)
                results = [store.read_result(tid) for tid in store.trial_ids()]
                states = {r.state.value for r in results if r}
                if len(results) != args.trials or states != {"COMPLETED"}:
                    raise RuntimeError(f"{len(results)} results, states {states}")
                first = min(r.finished_at - r.seconds for r in results)
                span = max(r.finished_at for r in results) - first
                status = [master("status", "--experiment", EXPERIMENT, **where)[0] for _ in range(args.rounds)]
                report = [master("report", "--experiment", EXPERIMENT, **{**where, "url": None})[0]
                          for _ in range(args.rounds)]
                files = sum(1 for p in storage.rglob("*") if p.is_file())

    n = args.trials
    figures = {
        "trials": n, "workers": args.workers, "redis": version, "cpus": os.cpu_count(),
        "load_before": os.getloadavg()[0],
        "launch_s": launch_wall, "launch_cpu_s": launch_cpu,
        "trials_per_s": n / span, "span_s": span,
        "watch_s": watch_wall, "watch_cpu_s": watch_cpu, "watch_cpu_share": watch_cpu / watch_wall,
        "redis_idle_mb": idle / 2**20, "redis_per_trial_queued_b": (queued - idle) / n,
        "redis_per_trial_done_b": (done - idle) / n,
        "status_midway_s": midway, "status_s": statistics.median(status), "status_all": status,
        "report_s": statistics.median(report), "report_all": report, "files": files,
    }
    print(json.dumps(figures, indent=1, default=lambda v: round(v, 3)))
    print(f"{n} trivial trials, {args.workers} workers, Redis {version}: {n / span:.1f} trials/s "
          f"({span:.1f} s from the first trial's start to the last one's end)")
    print(f"master launch --no-wait (plan, record {n} specs, enqueue): {launch_wall:.1f} s wall, "
          f"{launch_cpu:.1f} s CPU")
    print(f"master {args.follow}: {watch_wall:.1f} s wall, {watch_cpu:.1f} s CPU = "
          f"{100 * watch_cpu / watch_wall:.0f}% of a core")
    print(f"Redis memory per trial: {(queued - idle) / n:.0f} B queued, {(done - idle) / n:.0f} B after completion")
    print(f"master status: {midway:.2f} s midway through the stage, median {statistics.median(status):.2f} s of "
          f"{len(status)} after it; master report: median {statistics.median(report):.2f} s of {len(report)} "
          f"({files} files in storage)")
    if args.markdown:
        print(f"| {n:,} | {args.workers} | {n / span:.1f} | {(queued - idle) / n:.0f} B / {(done - idle) / n:.0f} B "
              f"| master {args.follow}: {100 * watch_cpu / watch_wall:.0f}% ({watch_cpu:.1f} s in {watch_wall:.0f} s) "
              f"| {midway:.1f} s / {statistics.median(status):.1f} s | {statistics.median(report):.1f} s |")


if __name__ == "__main__":
    main()
