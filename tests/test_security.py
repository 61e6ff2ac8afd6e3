"""Hostile input through the real entry points: jobs, payloads, npz files, names, sizes, passwords, TLS."""
import os
import pickle
import subprocess
import sys
import time
import tracemalloc
import uuid
import zipfile
import zlib

import numpy as np
import psutil
import pytest
import redis
from click.testing import CliRunner
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.serializers import JSONSerializer

from conftest import record_experiment, self_signed_certificate
from master.cli import main
from master.monitor import is_error
from nncore.data import load_dataset
from nncore.errors import DataError
from conftest import NullControl
from worker.spec import TrialSpec
from worker.store import ExperimentStore, StorageError, load_npz
from worker.trainer import run_trial

TINY = dict(stage="coarse", dataset="spiral", model={"hidden": [8]}, solver={"batch_size": 64}, epochs=2, seed=0)


class Payload:
    """Unpickling it creates ``marker``: proof that something unpickled attacker data."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def pickled_npz(path, marker, **plain):
    """An .npz whose array ``x`` is an object array holding a Payload (np.savez pickles it)."""
    np.savez(path, x=np.array([Payload(marker)], dtype=object), **plain)
    return path


def spec_dict(experiment, index=0, **overrides):
    """A trial spec as a job carries it; ``overrides`` may make it invalid (a hostile client's job)."""
    valid = TrialSpec(experiment="x", trial_id=f"coarse-{index:04d}", **TINY).to_dict()
    return {**valid, "experiment": experiment, **overrides}


def files_under(path):
    return sorted(p for p in path.rglob("*") if p.is_file())


def cli(*args):
    """``master ...`` in a fresh process (its own logging set-up, as a user runs it)."""
    return subprocess.run([sys.executable, "-m", "master.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "500"})  # rich wraps no line


@pytest.fixture
def rq_queue(real_redis):
    """(client, queue name, tag) on the real Redis; the tag's keys and RQ set members are removed afterwards."""
    url, tag = real_redis
    conn = redis.Redis.from_url(url)
    yield conn, f"sec-{tag}", tag
    for registry in (b"rq:queues", b"rq:workers"):
        members = [m for m in conn.smembers(registry) if tag.encode() in m]
        if members:
            conn.srem(registry, *members)


@pytest.mark.slow
@pytest.mark.redis
def test_a_worker_refuses_hostile_jobs_and_keeps_working(rq_queue, real_redis, tmp_path):
    conn, queue_name, tag = rq_queue
    url = real_redis[0]
    queue = Queue(queue_name, connection=conn, serializer=JSONSerializer)
    storage = tmp_path / "a" / "b" / "storage"  # "../../etc" from a trial or experiment folder stays under tmp_path
    marker = tmp_path / "pwned"
    experiment = f"sec-{tag}"
    store = ExperimentStore(storage, experiment).ensure()
    run_trial(TrialSpec.from_dict(spec_dict(experiment, 5, epochs=1)), store, NullControl())
    pickled_npz(store.latest_checkpoint("coarse-0005").path, marker)  # its checkpoint swapped for a pickled one

    jobs = {
        "os.system": queue.enqueue("os.system", f"touch {marker}"),
        "eval": queue.enqueue("builtins.eval", f"open({str(marker)!r}, 'w')"),
        "pickle": queue.enqueue("worker.jobs.train_trial", {}),
        "trial traversal": queue.enqueue("worker.jobs.train_trial", spec_dict(experiment, trial_id="../../etc")),
        "experiment traversal": queue.enqueue("worker.jobs.train_trial", spec_dict("../../etc")),
        "huge": queue.enqueue("worker.jobs.train_trial", spec_dict(experiment, 1, model={"hidden": [10**9]})),
        "pickled checkpoint": queue.enqueue("worker.jobs.train_trial", spec_dict(experiment, 5, epochs=2)),
        "fine": queue.enqueue("worker.jobs.train_trial", spec_dict(experiment, 2)),
    }
    conn.hset(jobs["pickle"].key, "data", zlib.compress(pickle.dumps(("worker.jobs.train_trial", None,
                                                                        [Payload(marker)], {}))))
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "worker.cli", "start", "--url", url, "--storage",
                                   str(storage), "--queue", queue_name, "--name", f"sec-{tag}", "--burst"],
                                  stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    peak = 0
    while worker.poll() is None:
        try:
            peak = max(peak, psutil.Process(worker.pid).memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    assert worker.wait(120) == 0, log.read_text()
    assert peak < 500 * 2**20, f"worker peak RSS {peak / 2**20:.0f} MiB"  # a 10^9-unit layer would need > 200 GB

    def failure(name):
        job = Job.fetch(jobs[name].id, connection=conn, serializer=JSONSerializer)
        assert job.get_status() == JobStatus.FAILED, name
        return job.latest_result().exc_string

    assert failure("os.system") == "refused: 'os.system' is not an allowed job function"
    assert failure("eval") == "refused: 'builtins.eval' is not an allowed job function"
    assert failure("pickle").startswith("refused: the job's data is not a JSON job payload (pickled or corrupt)")
    assert "SpecError: trial_id: '../../etc' is not a valid name" in failure("trial traversal")
    assert "SpecError: experiment: '../../etc' is not a valid name" in failure("experiment traversal")
    assert ("SpecError: model.hidden: expected a list of 0 to 64 ints in [1, 65536], got [1000000000]"
            in failure("huge"))
    result = store.read_result("coarse-0005")
    assert result.state == "FAILED" and "unreadable checkpoint" in result.reason
    assert "Object arrays cannot be loaded when allow_pickle=False" in result.reason
    assert Job.fetch(jobs["fine"].id, connection=conn, serializer=JSONSerializer).get_status() == JobStatus.FINISHED
    assert store.read_result("coarse-0002").state == "COMPLETED"  # the same worker process, still sound

    assert not marker.exists()
    assert [p for p in files_under(tmp_path) if storage not in p.parents] == [log]
    assert store.trial_ids() == ["coarse-0002", "coarse-0005"]


@pytest.fixture
def experiment_store(tmp_path):
    """A storage root with a finished two-trial experiment ``exp`` (spiral, tiny MLPs)."""
    store = ExperimentStore(tmp_path / "storage", "exp").ensure()
    record_experiment(store)
    for i in range(2):
        run_trial(TrialSpec.from_dict(spec_dict("exp", i, seed=i)), store, NullControl())
    return store


def test_object_array_npz_files_are_refused_and_never_unpickled(experiment_store, tmp_path):
    store, marker = experiment_store, tmp_path / "pwned"
    base = ["--storage", str(store.root), "--experiment", "exp"]
    inputs = pickled_npz(tmp_path / "x.npz", marker)
    done = cli("predict", *base, "--trial", "coarse-0000", "--input", str(inputs), "--output", str(tmp_path / "p.npz"))
    assert done.returncode == 2 and not (tmp_path / "p.npz").exists()
    assert done.stderr.strip() == (f"Error: {inputs}: x is an object array; pickled data is refused, save plain "
                                   "numbers")

    best = store.checkpoints("coarse-0001")[0].path
    pickled_npz(best, marker, **{"param.W1": np.zeros((2, 8), np.float32)})  # a trial's best checkpoint, pickled
    np.savez(tmp_path / "plain.npz", x=np.zeros((3, 2), np.float32))
    done = cli("predict", *base, "--trial", "coarse-0001", "--input", str(tmp_path / "plain.npz"),
               "--output", str(tmp_path / "p.npz"))
    assert done.returncode == 0, done.stderr  # served by its next readable checkpoint
    assert "Object arrays cannot be loaded when allow_pickle=False" in done.stderr and best.name in done.stderr
    done = cli("ensemble", *base, "--top", "2", "--name", "pair")
    assert done.returncode == 0, done.stderr
    assert "Object arrays cannot be loaded" in done.stderr and best.name in done.stderr
    assert not marker.exists()


def test_traversal_in_names_is_refused_and_writes_nothing(tmp_path):
    storage = tmp_path / "a" / "b" / "storage"
    storage.mkdir(parents=True)
    configs = {
        "experiment": '[experiment]\nname = "../../etc"\n',
        "stage": '[experiment]\nname = "x"\n[stages."../../etc"]\nepochs = 1\ntrials = 1\n',
    }
    for what, text in configs.items():
        path = tmp_path / f"{what}.toml"
        path.write_text(text)
        done = cli("launch", "--config", str(path), "--storage", str(storage), "--url", "redis://127.0.0.1:1/0")
        assert done.returncode == 2, done.stdout + done.stderr
        assert done.stderr.count("\n") == 1 and "'../../etc' is not a valid name" in done.stderr
    for args in (["status", "--experiment", "../../etc"], ["report", "--experiment", "../../etc"],
                 ["kill", "coarse-0000", "--experiment", "../../etc"],
                 ["predict", "--experiment", "../../etc", "--trial", "x", "--input", "x.npz", "--output", "y.npz"]):
        done = CliRunner().invoke(main, [*args, "--storage", str(storage)])
        assert done.exit_code == 2 and "experiment: '../../etc' is not a valid name" in done.output, args
    assert files_under(tmp_path) == sorted(tmp_path / f"{what}.toml" for what in configs)


def test_an_absurd_layer_is_refused_clearly_without_allocating(tmp_path):
    path = tmp_path / "huge.toml"
    path.write_text('[experiment]\nname = "huge"\n[space.model]\n'
                    'hidden = { dist = "choice", values = [[64], [1000000000]] }\n')
    tracemalloc.start()
    try:
        done = CliRunner().invoke(main, ["launch", "--config", str(path), "--storage", str(tmp_path),
                                         "--url", "redis://127.0.0.1:1/0"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert done.exit_code == 2
    assert done.output.strip() == ("Error: space.model.hidden: [1000000000] is rejected: model.hidden: expected a "
                                   "list of 0 to 64 ints in [1, 65536], got [1000000000]")
    assert peak < 50 * 2**20 and files_under(tmp_path) == [path]


@pytest.mark.slow
@pytest.mark.redis
def test_passwords_never_reach_output_logs_or_storage(rq_queue, real_redis, tmp_path, write_config):
    conn, queue_name, tag = rq_queue
    user, password = f"hs-sec-{tag}", f"s3cret-{uuid.uuid4().hex}"
    conn.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"], channels=["*"], commands=["+@all"])
    try:
        good = real_redis[0].replace("redis://", f"redis://{user}:{password}@", 1)
        gone = f"redis://:{password}@127.0.0.1:1/0"
        garbled = f"redis://:{password[:6]}/{password[6:]}@127.0.0.1:1/0"  # a '/' the user did not encode
        storage = tmp_path / "storage"
        storage.mkdir()
        config = write_config(f"sec-{tag}", dataset="spiral", trials=2)
        common = ["--storage", str(storage), "--queue", queue_name]
        runs = [
            cli("-vv", "launch", "--config", str(config), "--url", gone, *common),
            cli("-vv", "launch", "--config", str(config), "--url", good, "--no-wait", *common),
            cli("-vv", "status", "--url", good, *common),
            cli("-vv", "status", "--url", gone, *common),
            cli("-vv", "kill", "coarse-0000", "--url", good, *common),
            cli("-vv", "report", "--storage", str(storage)),
            cli("-vv", "status", "--url", garbled, *common),
        ]
        assert [r.returncode for r in runs] == [2, 0, 0, 0, 0, 0, 0], [r.stderr for r in runs]
        assert runs[0].stderr.strip() == ("Error: cannot reach Redis at redis://:***@127.0.0.1:1/0: Error 111 "
                                          "connecting to 127.0.0.1:1. Connection refused.")
        assert f"redis://{user}:***@127.0.0.1:6379/14" in runs[1].stdout  # the URL is shown, masked
        assert "Redis unreachable, showing shared storage only (cannot reach Redis at redis://:***@" in \
            " ".join(runs[3].stdout.split())
        assert "cannot use Redis URL redis://:***@127.0.0.1:1/0: its password holds" in " ".join(runs[6].stdout.split())
        shown = "".join(r.stdout + r.stderr for r in runs)
        assert password[:6] not in shown and password[6:] not in shown
        for path in files_under(storage):
            assert password.encode() not in path.read_bytes(), path
    finally:
        conn.acl_deluser(user)


@pytest.mark.slow
def test_a_rediss_url_verifying_the_server_works_from_launch_to_worker(tls_redis, tmp_path, write_config):
    url, password = tls_redis
    storage = tmp_path / "storage"
    storage.mkdir()
    config = write_config("tls", dataset="spiral", trials=1)
    launch = cli("launch", "--config", str(config), "--url", url, "--storage", str(storage), "--no-wait")
    assert launch.returncode == 0, launch.stderr
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.run([sys.executable, "-m", "worker.cli", "start", "--url", url, "--storage",
                                 str(storage), "--burst"], stdout=out, stderr=subprocess.STDOUT, timeout=120)
    assert worker.returncode == 0, log.read_text()
    assert ExperimentStore(storage, "tls").read_result("coarse-0000").state == "COMPLETED"
    status = cli("status", "--url", url, "--storage", str(storage))
    assert status.returncode == 0 and "COMPLETED" in status.stdout

    other, _ = self_signed_certificate(tmp_path, "other")  # a server we cannot vouch for is refused
    refused = cli("status", "--url", url.replace(url.rsplit("=", 1)[1], str(other)), "--storage", str(storage))
    assert "certificate verify failed" in refused.stdout
    shown = launch.stdout + launch.stderr + log.read_text() + status.stdout + refused.stdout + refused.stderr
    assert "rediss://:***@127.0.0.1" in shown and password not in shown


def forged_npz(path, claimed=(10**12, 1)):
    """An .npz whose array ``x`` holds 128 float64s but whose header claims ``claimed`` elements."""
    np.savez(path, x=np.zeros((2, 64)), y=np.zeros(2, dtype=np.int64))
    with zipfile.ZipFile(path) as z:
        members = {name: z.read(name) for name in z.namelist()}
    raw = members["x.npy"]
    end = raw.index(b"\n") + 1
    header = raw[10:end].decode().replace("(2, 64)", str(claimed))
    members["x.npy"] = raw[:10] + header[:-1].ljust(end - 11).encode() + b"\n" + raw[end:]
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_absurd_configs_are_refused_in_one_line_before_any_work(tmp_path, write_config):
    storage = tmp_path / "storage"
    storage.mkdir()
    config = write_config("absurd")
    text = config.read_text()
    cases = {
        "stages.coarse.trials: 1000000000 is more than the 100,000": text.replace("trials = 4", "trials = 1000000000"),
        "config larger than 1024 KiB": text + "".join(f"# padding {i} {'x' * 80}\n" for i in range(15_000)),
        "watch.heartbeat_seconds: 3 is too short: workers beat every 10 s": text + "[watch]\nheartbeat_seconds = 3\n",
    }
    for expected, body in cases.items():
        config.write_text(body)
        started = time.monotonic()
        done = cli("launch", "--config", str(config), "--storage", str(storage))
        assert (done.returncode, done.stdout) == (2, ""), (expected, done.stdout, done.stderr)
        assert done.stderr.strip().splitlines() == [f"Error: {done.stderr.strip()[7:]}"] and expected in done.stderr
        assert time.monotonic() - started < 30
    config.write_text(text)
    done = cli("launch", "--config", str(config), "--storage", str(storage), "--trials", "1000000000")
    assert done.returncode == 2 and "--trials: 1000000000 is more than the 100,000" in done.stderr
    assert "Traceback" not in done.stderr and files_under(storage) == []


def test_a_forged_npz_header_is_refused_in_one_line_without_allocating(experiment_store, tmp_path):
    forged = forged_npz(tmp_path / "forged.npz")
    done = cli("predict", "--storage", str(experiment_store.root), "--experiment", "exp", "--trial", "coarse-0000",
               "--input", str(forged), "--output", str(tmp_path / "out.npz"))
    assert done.returncode == 2, done.stderr
    assert "array 'x' claims shape (1000000000000, 1) (8,000,000,000,000 bytes) but holds" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "MemoryError" not in done.stderr
    with pytest.raises(DataError, match="claims shape"):
        load_dataset(f"npz:{forged}")
    with pytest.raises(StorageError, match="claims shape"):
        load_npz(forged)


def test_csv_errors_never_quote_the_files_contents(tmp_path):
    secret = tmp_path / "secret.csv"
    secret.write_text("s3cr3t:x:0:0:s3cr3t:/bin/bash\nhunter2:x:1:1\n")
    numbers = tmp_path / "numbers.csv"
    numbers.write_text("a,label\n1.0,0\nhunter2,1\n")
    fractional = tmp_path / "fractional.csv"
    fractional.write_text("a,label\n1.0,0.5\n")
    for path in (secret, numbers, fractional):
        with pytest.raises(DataError) as caught:
            load_dataset(f"csv:{path}")
        message = str(caught.value).replace(str(path), "")
        assert "s3cr3t" not in message and "hunter2" not in message, message
        assert "0.5" not in message


@pytest.mark.slow
@pytest.mark.redis
def test_a_job_for_a_dataset_its_experiment_does_not_declare_is_refused(rq_queue, real_redis, tmp_path):
    conn, queue_name, tag = rq_queue
    queue = Queue(queue_name, connection=conn, serializer=JSONSerializer)
    experiment = f"sec-{tag}"
    store = ExperimentStore(tmp_path / "storage", experiment).ensure()
    record_experiment(store, config={"experiment": {"name": experiment, "dataset": "spiral"}})
    hostile = queue.enqueue("worker.jobs.train_trial", spec_dict(experiment, 0, dataset="csv:/etc/passwd"))
    fine = queue.enqueue("worker.jobs.train_trial", spec_dict(experiment, 1))
    done = subprocess.run([sys.executable, "-m", "worker.cli", "start", "--url", real_redis[0], "--storage",
                           str(store.root), "--queue", queue_name, "--name", f"sec-{tag}", "--burst"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    result = store.read_result("coarse-0000")
    assert result.state == "FAILED"
    assert result.reason == (f"refused: dataset 'csv:/etc/passwd' is not the one experiment {experiment} declares "
                             f"('spiral')")
    assert store.read_history("coarse-0000") == [] and store.checkpoints("coarse-0000") == []
    assert "root:" not in done.stdout + done.stderr + "".join(p.read_text() for p in files_under(store.root)
                                                              if p.suffix in (".json", ".jsonl"))
    assert "Traceback" not in done.stdout + done.stderr
    assert Job.fetch(hostile.id, connection=conn, serializer=JSONSerializer).get_status() == JobStatus.FINISHED
    assert store.read_result("coarse-0001").state == "COMPLETED"
    assert not is_error(result)  # neither retried nor counted toward quarantining the worker
