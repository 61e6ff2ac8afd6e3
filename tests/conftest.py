"""Shared test fixtures: small experiment configs, the real Redis on 127.0.0.1:6379 (and a TLS one), waiting for
processes to end."""
import os
import signal
import shutil
import socket
import subprocess
import time
import uuid

import psutil
import pytest
import redis

# A shell without job control starts its background commands with SIGINT ignored, and every process they start
# inherits that: a `master launch` the tests interrupt with SIGINT would ignore it. Take Python's handler back,
# which an exec resets to the default for the test's children.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REAL_REDIS_URL = "redis://127.0.0.1:6379/14"  # a database of its own; every key a test makes carries its token

CONFIG_TEMPLATE = """\
[experiment]
name = "{name}"
dataset = "{dataset}"
seed = 0

[solver]
update = "adam"
batch_size = 64

[stages.coarse]
epochs = {epochs}
trials = {trials}
prune = "{prune}"

[stages.medium]
epochs = {epochs_medium}
trials = 2
method = "narrow"

[space.solver]
lr = {{ dist = "loguniform", low = 1e-3, high = 1e-2 }}

[space.model]
hidden = {{ dist = "choice", values = [[32], [64]] }}
"""


FAULTS_CONFIG = """\
[experiment]
name = "{name}"
dataset = "digits"
seed = 0

[model]
hidden = [256]

[solver]
update = "adam"
batch_size = 8

[stages.coarse]
epochs = {epochs}
trials = {trials}
prune = "none"

[space.solver]
lr = {{ dist = "loguniform", low = 1e-4, high = 1e-3 }}

[watch]
heartbeat_seconds = {heartbeat}
poll_seconds = 0.5
"""  # the fault tests' stage: small batches, so a trial of a few dozen epochs lasts seconds


def answers(client) -> bool:
    """Whether the Redis server behind ``client`` answers PING."""
    try:
        return client.ping()
    except redis.RedisError:
        return False


def reap(procs, server=None) -> None:
    """SIGKILL the processes of ``procs`` still running and the Redis ``server`` (a Popen or None); wait for each."""
    alive = [p for p in [*procs, server] if p is not None and p.poll() is None]
    for p in alive:
        p.send_signal(signal.SIGKILL)
    for p in alive:
        p.wait(10)


def wait_for(predicate, timeout: float = 30.0, what: str = "the condition", interval: float = 0.05) -> None:
    """Poll ``predicate`` every ``interval`` seconds until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture()
def write_config(tmp_path):
    """``write_config(name, dataset="digits", epochs=1, trials=4, prune="asha") -> Path`` of a small TOML
    config (``prune="none"``: no trial of the first stage is stopped early)."""
    def write(name: str, dataset: str = "digits", epochs: int = 1, trials: int = 4,
              prune: str = "asha") -> os.PathLike:
        path = tmp_path / f"{name}.toml"
        path.write_text(CONFIG_TEMPLATE.format(name=name, dataset=dataset, epochs=epochs, trials=trials,
                                               prune=prune, epochs_medium=epochs + 2))
        return path
    return write


@pytest.fixture()
def real_redis():
    """(url, token) for the real Redis on 127.0.0.1:6379 (skipped when absent, except under CI=true);
    every key containing ``token`` is deleted afterwards."""
    client = redis.Redis.from_url(REAL_REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.ConnectionError:
        if os.environ.get("CI"):
            raise
        pytest.skip("no Redis server on 127.0.0.1:6379")
    token = f"t{uuid.uuid4().hex[:10]}"
    try:
        yield REAL_REDIS_URL, token
    finally:
        keys = list(client.scan_iter(match=f"*{token}*", count=1000))
        if keys:
            client.delete(*keys)
        for registry in (b"rq:queues", b"rq:workers"):
            members = [m for m in client.smembers(registry) if token.encode() in m]
            if members:
                client.srem(registry, *members)
        client.close()


@pytest.fixture
def keep_signal_handlers():
    """The worker installs SIGINT/SIGTERM handlers and uses SIGALRM; give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture
def storage(tmp_path, monkeypatch):
    """A storage root for in-process workers, given to them through $HYPERSEARCH_STORAGE."""
    monkeypatch.setenv("HYPERSEARCH_STORAGE", str(tmp_path))
    return tmp_path


def self_signed_certificate(directory, name: str = "cert") -> tuple:
    """(certificate, key) paths of a fresh self-signed certificate for 127.0.0.1 (skips without openssl)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs openssl to make a self-signed certificate")
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture
def tls_redis(tmp_path):
    """(url, password): a password-protected redis-server speaking only TLS on a free port, its URL verifying the
    server's certificate (``ssl_cert_reqs=required&ssl_ca_certs=...``); skips where none can be started."""
    cert, key = self_signed_certificate(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    password = f"pw-{uuid.uuid4().hex}"
    url = f"rediss://:{password}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={cert}"
    for binary in dict.fromkeys(filter(None, [shutil.which("redis-server"), "/usr/bin/redis-server"])):
        server = subprocess.Popen(
            [binary, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
             "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", "--requirepass", password, "--save", "",
             "--appendonly", "no", "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(50):
                if server.poll() is not None:
                    break
                try:
                    redis.Redis.from_url(url, socket_connect_timeout=0.2).ping()
                except redis.RedisError:
                    time.sleep(0.05)
                    continue
                yield url, password
                return
        finally:
            server.terminate()
            server.wait(10)
    pytest.skip("no redis-server here speaks TLS")


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """True once ``pid`` no longer exists (or is a zombie waiting for its reaper) within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture()
def gone():
    """The ``wait_gone(pid, timeout=10.0) -> bool`` helper."""
    return wait_gone


class NullControl:
    """No control plane (tests that run a trial in-process): never asked to stop, reports go nowhere."""

    def should_stop(self):
        return None

    def confirm(self):
        pass

    def report(self, fields):
        pass


def record_result(store, trial_id, result):
    """Fixture: move a trial along a legal path of its life cycle to the state of ``result`` (a dict shaped like
    result.json), through the store's one transition function."""
    from worker.states import TrialState

    state = TrialState(result["state"])
    fields = {k: v for k, v in result.items() if k not in ("state", "reason", "trial_id")}
    current = store.read_result(trial_id)
    if current is not None and current.terminal:
        store.transition(trial_id, TrialState.QUEUED, "fixture", "queued")
    if state is TrialState.QUEUED:
        return store.transition(trial_id, state, result.get("reason", ""), "queued", **fields)
    store.transition(trial_id, TrialState.RUNNING, "fixture", "started")
    if state is TrialState.RUNNING:
        return store.read_result(trial_id)
    return store.transition(trial_id, state, result.get("reason", ""), "finished", **fields)


def record_stage(store, stage, trial_ids, status="launched", **fields):
    """Fixture: a stage record (stages/<stage>.json) launched with ``trial_ids``."""
    from worker.records import StageRecord
    from worker.states import StageStatus

    defaults = {"method": "random", "epochs": 1, "seed": 0}
    store.write_stage(StageRecord(stage=stage, trial_ids=tuple(trial_ids), status=StageStatus(status),
                                  **{**defaults, **fields}))


def record_experiment(store, config=None, config_text="", seed=0):
    """Fixture: experiment.json of ``store``'s experiment (its config dict and TOML text)."""
    from worker.records import ExperimentRecord

    store.write_experiment(ExperimentRecord(store.experiment, config or {}, config_text, seed, "2026-01-01T00:00:00"))


def outcome(store, trial_id):
    """The trial's record once it has an outcome (COMPLETED, KILLED, DIVERGED, FAILED), else None."""
    result = store.read_result(trial_id)
    return result if result is not None and result.terminal else None


def ever_started(store, trial_id):
    """Whether a worker ever started the trial (its events say so)."""
    return any(e.get("event") == "started" for e in store.read_events(trial_id))
