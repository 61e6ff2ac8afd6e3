"""Faults across hosts: workers in two network namespaces, a SIGKILLed worker, a 20 s partition, a Redis restart."""
import os
import re
import shutil
import subprocess
import sys
import time
import uuid

import pytest
import redis

from master.dispatch import Dispatcher
from master.embedded import free_port, redis_server_binary
from master.leaderboard import build_leaderboard
from worker.store import Checkpoint, ExperimentStore, load_npz

from conftest import FAULTS_CONFIG, answers, reap, outcome, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.netns, pytest.mark.timeout(300)]

TRIALS, EPOCHS = 24, 40  # ~2 s of training each: the stage outlasts the kill and the Redis restart
PARTITION_SECONDS = 20
HEARTBEAT_SECONDS = 15  # [watch]: above the workers' 10 s heartbeat, below the partition

CONFIG = FAULTS_CONFIG.format(name="faults", epochs=EPOCHS, trials=TRIALS, heartbeat=HEARTBEAT_SECONDS)


def ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def netns_problem():
    """Why this machine cannot run the test (None when it can)."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    probe = f"hsprobe{os.getpid()}"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


class Hosts:
    """Two network namespaces ("hosts") joined to this one by veth pairs, a private /30 each; always removed."""

    def __init__(self):
        tag = os.getpid() % 100000
        used = ip("-4", "addr").stdout
        octet = next(o for o in range(tag % 250, tag % 250 + 250) if f"10.231.{o % 250}." not in used) % 250
        self.names = {"a": f"hs{tag}a", "b": f"hs{tag}b"}
        self.host_ip = {"a": f"10.231.{octet}.1", "b": f"10.231.{octet}.5"}
        self.ns_ip = {"a": f"10.231.{octet}.2", "b": f"10.231.{octet}.6"}

    def veth(self, side, end):
        return f"{self.names[side]}{end}"  # end 0: this namespace, 1: the host's

    def create(self):
        for side, ns in self.names.items():
            ip("netns", "add", ns)
            ip("link", "add", self.veth(side, 0), "type", "veth", "peer", "name", self.veth(side, 1))
            ip("link", "set", self.veth(side, 1), "netns", ns)
            ip("addr", "add", f"{self.host_ip[side]}/30", "dev", self.veth(side, 0))
            ip("link", "set", self.veth(side, 0), "up")
            ip("netns", "exec", ns, "ip", "addr", "add", f"{self.ns_ip[side]}/30", "dev", self.veth(side, 1))
            ip("netns", "exec", ns, "ip", "link", "set", self.veth(side, 1), "up")
            ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")

    def link(self, side, state):
        ip("netns", "exec", self.names[side], "ip", "link", "set", "dev", self.veth(side, 1), state)

    def remove(self):
        for side, ns in self.names.items():
            ip("netns", "del", ns, check=False)  # takes its veth end, and so the pair, with it
            ip("link", "del", self.veth(side, 0), check=False)


class Cluster:
    """Redis (AOF on) on this host, `worker start` processes in the namespaces, the master; all reaped at the end."""

    def __init__(self, tmp_path, hosts):
        self.tmp, self.hosts = tmp_path, hosts
        self.root = tmp_path / "storage"
        self.root.mkdir()
        self.password = f"pw-{uuid.uuid4().hex}"
        self.port = free_port()
        self.redis_dir = tmp_path / "redis"
        self.redis_dir.mkdir()
        self.server = None
        self.procs = {}

    def url(self, host_ip="127.0.0.1"):
        return f"redis://:{self.password}@{host_ip}:{self.port}/0"

    def start_redis(self):
        binds = ["127.0.0.1", *self.hosts.host_ip.values()]
        self.server = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", *binds, "--requirepass", self.password,
             "--appendonly", "yes", "--save", "", "--dir", str(self.redis_dir), "--logfile", "redis.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url(), socket_connect_timeout=0.5)
        wait_for(lambda: answers(client), 10, "redis-server")

    def restart_redis(self):
        """SHUTDOWN (the append-only file is flushed) and start the same server again."""
        try:
            redis.Redis.from_url(self.url()).shutdown()
        except redis.ConnectionError:
            pass  # the server closes the connection as it goes
        self.server.wait(30)
        self.start_redis()

    def spawn(self, name, args, netns=None):
        log = open(self.tmp / f"{name}.log", "wb")
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.procs[name] = subprocess.Popen(prefix + args, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "200"})
        log.close()
        return self.procs[name]

    def worker(self, name, side):
        url = self.url(self.hosts.host_ip[side])
        return self.spawn(name, [sys.executable, "-m", "worker.cli", "start", "--url", url, "--storage",
                                 str(self.root), "--name", name], netns=self.hosts.names[side])

    def master(self, *args):
        return subprocess.run([sys.executable, "-m", "master.cli", *args, "--url", self.url(), "--storage",
                               str(self.root)], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "COLUMNS": "200"})

    def logs(self):
        return {p.stem: p.read_text(errors="replace") for p in sorted(self.tmp.glob("*.log"))}

    def stop(self):
        reap(self.procs.values(), self.server)


@pytest.fixture
def cluster(tmp_path):
    problem = netns_problem()
    if problem:
        pytest.skip(f"cross-host fault test skipped: {problem}")
    hosts = Hosts()
    made = Cluster(tmp_path, hosts)
    try:
        hosts.create()
        made.start_redis()
        yield made
    finally:
        made.stop()
        hosts.remove()
        assert not {n for n in hosts.names.values() if n in ip("netns", "list").stdout}


def running(progress, worker):
    """The trial ``worker`` is running, by its live progress (None when it runs none)."""
    return next((tid for tid, p in progress.items() if p.get("state") == "RUNNING" and p.get("worker") == worker
                 and p.get("epoch", 0) >= 2), None)


def test_a_stage_survives_a_killed_worker_a_partition_and_a_redis_restart(cluster, tmp_path):
    config = tmp_path / "faults.toml"
    config.write_text(CONFIG)
    store = ExperimentStore(cluster.root, "faults")
    for name, side in (("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b")):
        cluster.worker(name, side)
    watcher = Dispatcher(redis.Redis.from_url(cluster.url()))
    wait_for(lambda: len(watcher.workers()) == 4, 30, "four workers registered")
    started = time.monotonic()
    master = cluster.spawn("master", [sys.executable, "-m", "master.cli", "launch", "--config", str(config), "--url",
                                      cluster.url(), "--storage", str(cluster.root), "--wait"])

    # 1. kill -9 a worker in the middle of a trial (after two epochs); a supervisor would start another
    wait_for(lambda: running(watcher.progress("faults"), "a1"), 60, "a1 two epochs into a trial")
    killed = running(watcher.progress("faults"), "a1")
    cluster.procs["a1"].kill()
    cluster.worker("a3", "a")

    # 2. cut host b off for 20 s while both its workers train; 3. meanwhile restart Redis (append-only file on)
    wait_for(lambda: all(running(watcher.progress("faults"), w) for w in ("b1", "b2")), 60, "b1 and b2 busy")
    partitioned = {w: running(watcher.progress("faults"), w) for w in ("b1", "b2")}
    cluster.hosts.link("b", "down")
    cut = time.monotonic()
    time.sleep(PARTITION_SECONDS / 4)
    unfinished = {tid for tid in store.trial_ids() if outcome(store, tid) is None} - set(partitioned.values())
    assert unfinished, "the stage ended before Redis could be restarted in the middle of it"
    cluster.restart_redis()
    time.sleep(max(0.0, cut + PARTITION_SECONDS - time.monotonic()))
    cluster.hosts.link("b", "up")

    assert master.wait(max(10, 240 - (time.monotonic() - started))) == 0, cluster.logs()["master"]
    logs = cluster.logs()
    assert "stage coarse completed" in logs["master"]

    # every trial ended in a terminal state exactly once: one finish line in all worker logs, COMPLETED
    ids = [f"coarse-{i:04d}" for i in range(TRIALS)]
    assert store.trial_ids() == ids
    worker_logs = "".join(text for name, text in logs.items() if name.startswith(("a", "b")))
    for tid in ids:
        finishes = re.findall(rf"trial {tid}: (COMPLETED|KILLED|DIVERGED|FAILED) ", worker_logs)
        assert finishes == ["COMPLETED"], (tid, finishes)
        result = store.read_result(tid)
        assert (result.state, result.epochs_done) == ("COMPLETED", EPOCHS), result
        # history and checkpoints intact: every epoch once, each checkpoint loads and its name matches history
        history = store.read_history(tid)
        assert [r["epoch"] for r in history] == list(range(1, EPOCHS + 1)), tid
        accs = {r["epoch"]: r["val_acc"] for r in history}
        ckpts = store.checkpoints(tid)
        assert ckpts and ckpts[0].path.name == result.checkpoint
        for c in ckpts:
            assert c.path.name == Checkpoint.filename(accs[c.epoch], c.epoch)
            assert int(load_npz(c.path)["epoch"]) == c.epoch
        assert result.best_val_acc == ckpts[0].val_acc == float(f"{max(accs.values()):.4f}")
    assert not list(cluster.root.rglob("*.tmp"))

    # the faults were noticed and repaired by the master, with their reasons
    def requeued_from(tid, worker):
        return any(e["event"] == "requeue" and e["reason"] == f"worker {worker} lost heartbeat"
                   for e in store.read_events(tid))
    assert requeued_from(killed, "a1")
    for worker, tid in partitioned.items():
        assert requeued_from(tid, worker), (worker, tid, store.read_events(tid))
        # back online, the cut-off run learns its trial was taken, stops and writes nothing (the checks above)
        wait_for(lambda: f"trial {tid}: no longer this worker's" in cluster.logs()[worker], 30, f"{worker} to let go")
    for name in ("a2", "a3", "b1", "b2"):
        assert cluster.procs[name].poll() is None, f"worker {name} exited:\n{cluster.logs()[name]}"

    # Redis agrees: every job finished once, nothing queued, running or failed
    done = {"queued": 0, "started": 0, "finished": TRIALS, "failed": 0, "stopped": 0}
    wait_for(lambda: watcher.counts("faults") == done, 10, f"RQ's counts to be {done}")

    # `master status` agrees with the leaderboard built from storage
    status = cluster.master("status", "--experiment", "faults", "--top", "5")
    assert status.returncode == 0, status.stderr
    board = build_leaderboard(store)
    row = next(line for line in status.stdout.splitlines() if line.strip("│ ").startswith("coarse"))
    assert [c.strip() for c in row.strip("│ ").split("│")] == ["coarse", "completed", str(TRIALS), str(TRIALS)]
    assert (board["state"] == "COMPLETED").sum() == TRIALS
    shown = re.findall(r"^\s*(coarse-\d{4})\s", status.stdout, flags=re.M)
    assert shown == list(board["trial"][:5])
    assert cluster.password not in "".join(logs.values()) + status.stdout + status.stderr
