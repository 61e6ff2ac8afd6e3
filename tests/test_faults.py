"""Faults of a week-long search, each with a private Redis server and real `worker start` processes: Redis restarted
empty, SIGTERM to a busy worker, a full or read-only storage. Each asserts every trial COMPLETED exactly once,
contiguous histories, no quarantine and no traceback."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import redis

from master.embedded import free_port, redis_server_binary
from worker.store import ExperimentStore

from conftest import FAULTS_CONFIG, answers, reap, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


class Site:
    """A throwaway Redis server (restartable, empty, on a free port), shared storage, `worker start` and `master`
    processes; every process is reaped at the end."""

    def __init__(self, tmp_path, name="faults", epochs=200, trials=4):
        self.tmp, self.name, self.epochs = tmp_path, name, epochs
        self.root = tmp_path / "storage"
        self.root.mkdir()
        self.config = tmp_path / f"{name}.toml"
        self.config.write_text(FAULTS_CONFIG.format(name=name, epochs=epochs, trials=trials, heartbeat=15))
        self.ids = [f"coarse-{i:04d}" for i in range(trials)]
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.server = None
        self.procs = {}
        self.outputs = []
        self.store = ExperimentStore(self.root, name)

    def start_redis(self):
        self.server = subprocess.Popen([redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                                        "--save", "", "--appendonly", "no"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        wait_for(lambda: answers(client), 10, "redis-server")
        return client

    def kill_redis(self):
        self.server.kill()
        self.server.wait(10)

    def worker(self, name, *extra):
        log = open(self.tmp / f"worker-{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "start", "--url", self.url, "--storage", str(self.root), "--name",
             name, *extra], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        return self.procs[name]

    def master(self, *args, redis=True):
        url = ["--url", self.url] if redis else []
        done = subprocess.run([sys.executable, "-m", "master.cli", *args, *url, "--storage", str(self.root)],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "COLUMNS": "200"})
        self.outputs.append(done.stdout + done.stderr)
        return done

    def launch(self):
        return self.master("launch", "--config", str(self.config))

    def logs(self):
        return "".join(p.read_text(errors="replace") for p in sorted(self.tmp.glob("worker-*.log")))

    def running(self, worker, epoch=2):
        """The trial ``worker`` is running at ``epoch`` or later, by storage (None when none)."""
        for tid in self.ids:
            result = self.store.read_result(tid)
            if result is not None and result.state == "RUNNING" and result.worker == worker:
                if len(self.store.read_history(tid)) >= epoch:
                    return tid
        return None

    def finished(self):
        return all((r := self.store.read_result(tid)) is not None and r.terminal for tid in self.ids)

    def assert_every_trial_completed_once(self):
        """Every trial COMPLETED with one finish event, epochs 1..E in its history, no quarantine, no traceback."""
        for tid in self.ids:
            result = self.store.read_result(tid)
            assert (result.state, result.epochs_done) == ("COMPLETED", self.epochs), (tid, result)
            finishes = [e for e in self.store.read_events(tid) if e["event"] == "finished"]
            assert len(finishes) == 1, (tid, finishes)
            assert [r["epoch"] for r in self.store.read_history(tid)] == list(range(1, self.epochs + 1)), tid
        everything = self.logs() + "".join(self.outputs)
        assert "Traceback" not in everything, everything[-5000:]
        assert "quarantined" not in everything
        assert not list(self.root.rglob("*.tmp"))

    def stop(self):
        reap(self.procs.values(), self.server)


@pytest.fixture
def site(tmp_path):
    made = Site(tmp_path)
    try:
        yield made
    finally:
        made.stop()


def test_redis_restarted_empty_without_a_watch_then_the_same_launch_finishes_every_trial_once(site):
    client = site.start_redis()
    assert site.launch().returncode == 0
    for name in ("w1", "w2"):
        site.worker(name)
    wait_for(lambda: site.running("w1") and site.running("w2"), 60, "both workers two epochs into a trial")
    site.kill_redis()
    client = site.start_redis()  # empty: the queue, the jobs and the workers' registrations are gone
    wait_for(lambda: site.logs().count("no longer this worker's") == 2, 60, "both runs to let their trials go")
    time.sleep(1.0)  # RQ records the ended jobs and the workers beat again
    fragments = [k for k in client.scan_iter(match="rq:job:*") if not client.hexists(k, "data")]
    assert fragments == []  # no worker recreated a job key holding only its heartbeat
    client.hset(f"rq:job:hs_{site.name}__{site.ids[0]}", "last_heartbeat", "2026-01-01T00:00:00.000000Z")  # RQ 2.x's

    relaunch = site.launch()  # the operator's one tool
    assert relaunch.returncode == 0, relaunch.stderr
    assert f"enqueued {len(site.ids)} of {len(site.ids)} trials" in relaunch.stdout
    wait_for(site.finished, 120, "every trial to finish")
    site.assert_every_trial_completed_once()
    assert site.launch().stdout.count("enqueued 0 of") == 1  # launching again after the end enqueues nothing


def test_a_busy_worker_stops_within_two_seconds_of_sigterm_ten_times_and_the_trial_resumes_each_time(tmp_path):
    site = Site(tmp_path, epochs=600, trials=1)
    try:
        site.start_redis()
        assert site.launch().returncode == 0
        (tid,) = site.ids
        for n in range(10):
            done = len(site.store.read_history(tid))
            proc = site.worker(f"w{n}")
            wait_for(lambda: len(site.store.read_history(tid)) > done, 60, f"worker w{n} to train an epoch")
            asked = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0, site.logs()[-3000:]
            assert time.monotonic() - asked < 2.0, f"worker w{n} took {time.monotonic() - asked:.1f} s"
            result = site.store.read_result(tid)
            assert (result.state, result.reason) == ("QUEUED", f"worker w{n} shutting down"), result
        assert site.worker("last", "--burst").wait(120) == 0
        site.assert_every_trial_completed_once()
        assert [e["event"] for e in site.store.read_events(tid)].count("handed back") == 10
    finally:
        site.stop()


def fill(directory):
    """Fill the file system of ``directory`` with one file until it is full; returns the file."""
    filler = directory / "filler.bin"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass
    return filler


@pytest.fixture
def tmpfs_site(tmp_path):
    """A Site whose storage is a small tmpfs of its own (root only), unmounted at the end."""
    made = Site(tmp_path, epochs=300)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(made.root)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield made
    finally:
        made.stop()
        subprocess.run(["umount", "-l", str(made.root)], check=False)


def test_a_full_then_read_only_storage_pauses_the_workers_and_every_trial_finishes_once(tmpfs_site):
    site = tmpfs_site
    client = site.start_redis()
    assert site.launch().returncode == 0
    watch_log = open(site.tmp / "watch.out", "wb")
    watcher = subprocess.Popen([sys.executable, "-m", "master.cli", "watch", "--experiment", site.name, "--url",
                                site.url, "--storage", str(site.root)], stdout=watch_log, stderr=subprocess.STDOUT)
    site.procs["watch"] = watcher
    for name in ("w1", "w2"):
        site.worker(name)

    def paused(count):
        return lambda: site.logs().count("storage full or read-only") >= count

    def no_fault_blamed():
        status = site.master("status", "--experiment", site.name)
        assert status.returncode == 0, status.stderr
        assert all(site.store.read_result(t) is None or site.store.read_result(t).state != "FAILED" for t in site.ids)
        assert client.llen("rq:queue:hypersearch") >= 1  # the queue was not drained by failing trials

    # 1. storage full: both busy workers pause, nothing fails, the queue waits; space returns, training goes on
    wait_for(lambda: site.running("w1") and site.running("w2"), 60, "both workers two epochs into a trial")
    filler = fill(site.root)
    wait_for(paused(2), 30, "the workers to pause")
    no_fault_blamed()
    filler.unlink()
    # 2. storage read-only (remounted): the same
    wait_for(lambda: any(site.running(w, epoch=1) for w in ("w1", "w2")), 60, "training to go on")
    seen = site.logs().count("storage full or read-only")
    subprocess.run(["mount", "-o", "remount,ro", str(site.root)], check=True)
    try:
        wait_for(paused(seen + 1), 30, "a worker to pause on the read-only storage")
        no_fault_blamed()
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(site.root)], check=True)

    assert watcher.wait(180) == 0  # the watch saw the stage to its end
    watch_log.close()
    site.outputs.append((site.tmp / "watch.out").read_text())
    site.assert_every_trial_completed_once()
    assert "No space left on device" in site.logs() and "Read-only file system" in site.logs()


def test_a_run_that_loses_its_trial_between_writing_and_renaming_writes_nothing(tmp_path, monkeypatch):
    """The window of a paused zombie: its job is requeued to another worker after its ownership check and before
    its rename (here: while the file is fsynced). The fence right before the rename forbids it."""
    import fakeredis
    import numpy as np

    from worker.control import RedisControl, TrialLost

    conn = fakeredis.FakeRedis()
    key = "rq:job:hs_zombie__coarse-0000"
    conn.hset(key, mapping={"status": "started", "worker_name": "w1", "data": "{}"})
    control = RedisControl(conn, "zombie", "coarse-0000", "w1", job_key=key)
    store = ExperimentStore(tmp_path, "zombie").ensure().fenced(control.confirm)
    store.write_checkpoint("coarse-0000", 1, 0.5, {"w": np.zeros(3)}, keep=2)
    store.append_history("coarse-0000", {"epoch": 1})
    fsync = os.fsync

    def requeued_meanwhile(fd):
        fsync(fd)
        conn.hset(key, mapping={"status": "started", "worker_name": "w2"})  # the master gave it to w2

    monkeypatch.setattr(os, "fsync", requeued_meanwhile)
    with pytest.raises(TrialLost):
        store.write_checkpoint("coarse-0000", 2, 0.6, {"w": np.ones(3)}, keep=2)
    with pytest.raises(TrialLost):
        store.append_history("coarse-0000", {"epoch": 2})
    assert [c.epoch for c in store.checkpoints("coarse-0000")] == [1]
    assert [r["epoch"] for r in store.read_history("coarse-0000")] == [1]
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_paused_worker_that_comes_back_after_its_trial_was_requeued_writes_nothing(tmp_path):
    site = Site(tmp_path, epochs=300, trials=1)
    try:
        site.start_redis()
        assert site.launch().returncode == 0
        watch_log = open(site.tmp / "watch.out", "wb")
        site.procs["watch"] = subprocess.Popen(
            [sys.executable, "-m", "master.cli", "watch", "--experiment", site.name, "--url", site.url, "--storage",
             str(site.root)], stdout=watch_log, stderr=subprocess.STDOUT)
        (tid,) = site.ids
        zombie = site.worker("w1")
        wait_for(lambda: site.running("w1"), 60, "w1 two epochs into the trial")
        zombie.send_signal(signal.SIGSTOP)  # past the watch's 15 s heartbeat timeout
        site.worker("w2")
        wait_for(lambda: site.running("w2", epoch=1), 90, "the watch to requeue the trial to w2")
        zombie.send_signal(signal.SIGCONT)
        wait_for(lambda: f"trial {tid}: no longer this worker's" in site.logs(), 30, "w1 to let the trial go")
        assert site.procs["watch"].wait(120) == 0
        watch_log.close()
        site.outputs.append((site.tmp / "watch.out").read_text())
        site.assert_every_trial_completed_once()
        assert site.store.read_result(tid).worker == "w2"
        assert any(e["event"] == "requeue" and e["reason"] == "worker w1 lost heartbeat"
                   for e in site.store.read_events(tid))
        assert zombie.poll() is None  # w1 lives on, not quarantined, ready for the next job
    finally:
        site.stop()


def test_corrupt_files_are_skipped_and_named_by_status_report_ensemble_and_watch(tmp_path):
    """Random bytes in a history.jsonl, a result.json holding a JSON list, random bytes in a result.json: every
    reader names the file and goes on; a trial with an unreadable result shows UNREADABLE (its state is unknown),
    never RUNNING; the watch requeues it (saying why) and it finishes from its last checkpoint."""
    site = Site(tmp_path, epochs=3)
    try:
        site.start_redis()
        assert site.launch().returncode == 0
        assert site.worker("w1", "--burst").wait(120) == 0
        trials = site.store.trials_dir
        junk = bytes(range(128, 256)) * 3 + b"\n\xff\xfe"
        (trials / site.ids[0] / "history.jsonl").write_bytes(junk)
        (trials / site.ids[1] / "result.json").write_text("[1, 2]\n")
        (trials / site.ids[2] / "result.json").write_bytes(junk)
        named = [f"{site.ids[0]}/history.jsonl", f"{site.ids[1]}/result.json", f"{site.ids[2]}/result.json"]
        for command in (["status"], ["report"], ["ensemble", "--top", "3"]):
            done = site.master(*command, "--experiment", site.name, redis=False)
            assert done.returncode == 0, done.stderr
            for path in named:
                assert path in done.stderr.replace("\n", ""), (command, path, done.stderr)
        status = site.outputs[-3]
        for tid in site.ids[1:3]:
            row = next(line for line in status.splitlines() if line.startswith(tid))
            assert "UNREADABLE" in row and "RUNNING" not in row, row

        out = open(site.tmp / "watch.out", "wb")
        watcher = subprocess.Popen([sys.executable, "-m", "master.cli", "watch", "--experiment", site.name, "--url",
                                    site.url, "--storage", str(site.root)], stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "COLUMNS": "200"})
        site.procs["watch"] = watcher
        said = lambda: (site.tmp / "watch.out").read_text().count("result.json is unreadable (corrupt)")  # noqa: E731
        wait_for(lambda: said() == 2, 30, "the watch to requeue the two trials with unreadable results")
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(10) == 130
        out.close()
        site.outputs.append((site.tmp / "watch.out").read_text())
        assert site.worker("w2", "--burst").wait(120) == 0
        for tid in site.ids:
            assert site.store.read_result(tid).state == "COMPLETED", tid
        for tid in site.ids[1:]:
            assert [r["epoch"] for r in site.store.read_history(tid)] == [1, 2, 3], tid
        everything = site.logs() + "".join(site.outputs)
        assert "Traceback" not in everything, everything[-5000:]
    finally:
        site.stop()


def test_redis_out_of_memory_pauses_the_workers_and_a_restart_under_the_same_name_is_not_refused(tmp_path):
    site = Site(tmp_path, epochs=150, trials=3)
    try:
        client = site.start_redis()
        assert site.launch().returncode == 0
        first = site.procs["first w1"] = site.worker("w1")
        wait_for(lambda: site.running("w1"), 60, "w1 two epochs into a trial")
        twin = site.worker("w1")  # a live namesake: refused in one line, saying how long its registration lasts
        assert twin.wait(30) == 2
        refusal = site.logs().splitlines()[-1]
        assert refusal.startswith("worker: a worker named 'w1' is registered (host ")
        assert "give another --name" in refusal
        assert re.search(r"wait \d+ s for its registration to expire$", refusal), refusal

        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", "1")  # every write refused from now on
        wait_for(lambda: "Redis out of memory" in site.logs() and "paused, next try" in site.logs(), 60,
                 "w1 to finish its trial and pause")
        assert first.poll() is None  # alive, not dead with a traceback
        first.kill()  # gone for good while Redis is full: its registration survives (it could not unregister)
        first.wait(10)
        assert client.exists("rq:worker:w1") and not client.hexists("rq:worker:w1", "death")
        client.config_set("maxmemory", "0")
        assert site.worker("w1", "--burst").wait(120) == 0  # the same name again: the stale registration goes
        assert "removing the registration its previous process" in site.logs()
        wait_for(site.finished, 60, "every trial to finish")
        site.assert_every_trial_completed_once()
    finally:
        site.stop()


def test_a_worker_on_another_storage_hands_the_job_back_untouched_and_quits_and_the_watch_says_why(site):
    site.start_redis()
    assert site.launch().returncode == 0
    assert len(site.store.read_experiment().id) == 16  # drawn at first launch; every job carries it
    watch_log = open(site.tmp / "watch.out", "wb")
    site.procs["watch"] = subprocess.Popen(
        [sys.executable, "-m", "master.cli", "watch", "--experiment", site.name, "--url", site.url, "--storage",
         str(site.root)], stdout=watch_log, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "300"})
    elsewhere = site.tmp / "elsewhere"
    elsewhere.mkdir()
    stray = subprocess.run([sys.executable, "-m", "worker.cli", "start", "--url", site.url, "--storage",
                            str(elsewhere), "--name", "stray"], capture_output=True, text=True, timeout=60)
    why = f"worker stray's storage {elsewhere} has no experiment {site.name}: is --storage the shared one?"
    assert stray.returncode == 2, stray.stderr
    last = stray.stderr.strip().splitlines()[-1]
    assert last == f"worker: {why} (the job went back to the queue; not taking any more)"
    assert list(elsewhere.iterdir()) == []  # nothing written where nobody reads
    queued = redis.Redis.from_url(site.url)
    assert queued.llen("rq:queue:hypersearch") == len(site.ids)  # every job still waits for a worker
    assert queued.lrange("rq:queue:hypersearch:intermediate", 0, -1) == []  # else RQ's maintenance would fail it
    wait_for(lambda: why in (site.tmp / "watch.out").read_text(), 30, "the watch to say why")
    refused = [e for tid in site.ids for e in site.store.read_events(tid) if e["event"] == "refused"]
    assert [e["reason"] for e in refused] == [why]
    assert (site.tmp / "watch.out").read_text().count("requeue") == 0  # no requeue loop

    for name in ("w1", "w2"):
        site.worker(name)
    assert site.procs["watch"].wait(180) == 0
    watch_log.close()
    site.outputs += [(site.tmp / "watch.out").read_text(), stray.stdout + stray.stderr]
    site.assert_every_trial_completed_once()
