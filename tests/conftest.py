"""Shared test fixtures: small experiment configs, the real Redis on 127.0.0.1:6379, waiting for processes to end."""
import os
import time
import uuid

import psutil
import pytest
import redis

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
        client.close()


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
