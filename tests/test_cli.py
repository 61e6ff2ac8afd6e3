"""The master CLI: validation errors (one line, exit 2, nothing written), launch against a URL, status."""
import json
import os
import stat
import subprocess
import sys
import time

import pytest
import redis
from click.testing import CliRunner

from master.cli import main
from worker.store import ExperimentStore
from conftest import record_result


@pytest.fixture()
def run(monkeypatch):
    """``run(*args) -> click Result`` with no Redis URL or storage root inherited from the environment."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("HYPERSEARCH_STORAGE", raising=False)
    runner = CliRunner()
    return lambda *args: runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def storage(tmp_path):
    root = tmp_path / "storage"
    root.mkdir()
    return root


def assert_refused(result, *fragments):
    """Exit 2, exactly one line on stderr naming the culprit, nothing on stdout."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize("text, culprit", [
    ("[experiment\nname = 'x'\n", "invalid TOML at line 1"),
    ("[experiment]\nname = 'x'\n[solver]\nlr = -1.0\n", "solver.lr"),
    ("[experiment]\nname = 'x'\ndataset = 'imagenet'\n", "experiment.dataset"),
    ("[experiment]\nname = 'x'\n[space.solver]\nlr = { dist = 'uniform', low = 1.0, high = 0.1 }\n", "space.solver.lr"),
])
def test_bad_config_is_refused_before_writing(run, storage, tmp_path, text, culprit):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    assert_refused(run("launch", "--config", config, "--storage", storage), culprit)
    assert list(storage.iterdir()) == []


def test_missing_config_file(run, storage, tmp_path):
    assert_refused(run("launch", "--config", tmp_path / "nope.toml", "--storage", storage), "nope.toml")


def test_dataset_file_that_does_not_load_is_refused(run, storage, tmp_path, write_config):
    config = write_config("npzexp", dataset=f"npz:{tmp_path / 'missing.npz'}")
    assert_refused(run("launch", "--config", config, "--storage", storage), "missing.npz")
    assert list(storage.iterdir()) == []


def test_unreachable_redis_is_refused_with_password_masked(run, storage, write_config):
    config = write_config("unreach")
    result = run("launch", "--config", config, "--storage", storage, "--url", "redis://:s3cret@127.0.0.1:1/0")
    assert_refused(result, "cannot reach Redis", "127.0.0.1:1")
    assert "s3cret" not in result.output
    assert list(storage.iterdir()) == []


def test_unreachable_redis_from_environment(run, storage, write_config, monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1")
    assert_refused(run("launch", "--config", write_config("envurl"), "--storage", storage), "cannot reach Redis")
    assert list(storage.iterdir()) == []


def test_storage_missing_or_not_a_directory(run, tmp_path, write_config):
    config = write_config("nostore")
    assert_refused(run("launch", "--config", config, "--storage", tmp_path / "absent"), "absent", "does not exist")
    assert not (tmp_path / "absent").exists()
    plain = tmp_path / "file"
    plain.write_text("")
    assert_refused(run("launch", "--config", config, "--storage", plain), "not a directory")


@pytest.fixture()
def unwritable_dir(tmp_path):
    """A directory this process cannot create files in (chmod 555; /sys for root, which ignores modes)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    try:
        (locked / "probe").touch()
    except PermissionError:
        yield locked
    else:
        (locked / "probe").unlink()
        if not os.path.isdir("/sys"):
            pytest.skip("running as root and no /sys: no directory is unwritable")
        yield "/sys"
    finally:
        locked.chmod(0o755)


def test_unwritable_storage_is_refused(run, write_config, unwritable_dir):
    result = run("launch", "--config", write_config("rostore"), "--storage", unwritable_dir)
    assert_refused(result, str(unwritable_dir), "not writable")
    assert not os.path.exists(os.path.join(unwritable_dir, "rostore"))


@pytest.mark.parametrize("args, culprit", [
    (["--stage", "nosuch"], "stage 'nosuch'"),
    (["--stage", "medium"], "stage medium: stage coarse before it has not been launched"),
    (["--stage", "medium", "--force"], "no finished trial to narrow from"),
    (["--all", "--trials", "3"], "--all runs every stage"),
    (["--no-wait"], "--no-wait needs --url"),
    (["--url", "redis://127.0.0.1:1", "--workers", "2"], "--workers"),
])
def test_option_combinations_refused(run, storage, write_config, args, culprit):
    assert_refused(run("launch", "--config", write_config("opts"), "--storage", storage, *args), culprit)
    assert list(storage.iterdir()) == []


@pytest.mark.redis
def test_same_name_with_another_config_or_seed_is_refused(run, storage, write_config, real_redis):
    url, token = real_redis
    name = f"clash-{token}"
    common = ["--storage", storage, "--url", url, "--queue", f"q-{token}", "--trials", 2]
    assert run("launch", "--config", write_config(name, epochs=1), *common).exit_code == 0
    before = {p: p.read_bytes() for p in storage.rglob("*") if p.is_file()}
    assert_refused(run("launch", "--config", write_config(name, epochs=2), *common), "different config")
    assert_refused(run("launch", "--config", write_config(name, epochs=1), *common, "--seed", 7),
                   "coarse-0000", "different settings")
    assert {p: p.read_bytes() for p in storage.rglob("*") if p.is_file()} == before


@pytest.mark.redis
def test_launch_with_url_records_and_enqueues_once(run, storage, write_config, real_redis):
    url, token = real_redis
    name, queue = f"cli-{token}", f"q-{token}"
    args = ["launch", "--config", write_config(name), "--storage", storage, "--url", url, "--queue", queue]
    first = run(*args)
    assert first.exit_code == 0, first.output
    assert "enqueued 4 of 4 trials of stage coarse" in first.stdout and "worker start" in first.stdout

    store = ExperimentStore(storage, name)
    experiment = store.read_experiment()
    assert experiment.name == name and experiment.config["experiment"]["name"] == name
    assert experiment.code_version and experiment.created_at and experiment.seed == 0
    stage = store.read_stage("coarse")
    assert list(stage.trial_ids) == [f"coarse-{i:04d}" for i in range(4)]
    assert stage.status == "launched" and stage.seed == 0 and set(stage.ranges) == {"solver.lr", "model.hidden"}
    assert store.trial_ids() == list(stage.trial_ids)
    assert not (store.dir / "local").exists()  # no embedded Redis with a URL

    client = redis.Redis.from_url(url)
    assert client.llen(f"rq:queue:{queue}") == 4
    second = run(*args)
    assert second.exit_code == 0
    assert "enqueued 0 of 4" in second.stdout and "4 already queued or finished" in second.stdout
    assert client.llen(f"rq:queue:{queue}") == 4

    status = run("status", "--storage", storage, "--url", url, "--queue", queue)
    assert status.exit_code == 0, status.output
    assert name in status.stdout and "QUEUED" in status.stdout and "running now" in status.stdout
    assert f"RQ jobs on queue {queue}: 4 queued, 0 started, 0 finished, 0 failed, 0 stopped" in " ".join(
        status.stdout.split())
    client.close()


@pytest.mark.redis
def test_status_without_redis_reads_storage(run, storage, write_config, real_redis):
    url, token = real_redis
    name = f"st-{token}"
    run("launch", "--config", write_config(name), "--storage", storage, "--url", url, "--queue", f"q-{token}")
    store = ExperimentStore(storage, name)
    record_result(store, "coarse-0001", {"state": "COMPLETED", "reason": "trained 1 epochs", "best_val_acc": 0.91,
                                       "best_epoch": 1, "epochs_done": 1, "worker": "w", "seconds": 0.2})
    result = run("status", "--storage", storage)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "no Redis given" in out and "running now" not in out
    assert "COMPLETED" in out and "QUEUED" in out and "coarse-0001" in out and "0.9100" in out
    unreachable = run("status", "--storage", storage, "--experiment", name, "--url", "redis://:pw9@127.0.0.1:1")
    assert unreachable.exit_code == 0
    assert "Redis unreachable" in unreachable.stdout and "pw9" not in unreachable.output


def test_status_refuses_unknown_experiment_and_empty_storage(run, storage):
    assert_refused(run("status", "--storage", storage), "no experiment found")
    (storage / "other").mkdir()
    (storage / "other" / "experiment.json").write_text(json.dumps({"name": "other"}))
    assert_refused(run("status", "--storage", storage, "--experiment", "nope"), "nope", "other")
    assert_refused(run("status", "--storage", storage, "--experiment", "../etc"), "experiment")


def test_help_explains_every_option(run):
    for command, options in {"launch": ["--stage", "--config", "--url", "--storage", "--trials", "--seed",
                                        "--workers", "--wait / --no-wait", "--force", "--queue"],
                             "status": ["--experiment", "--storage", "--url", "--top"]}.items():
        text = run(command, "--help").stdout
        for option in options:
            assert option in text


@pytest.mark.redis
@pytest.mark.slow
def test_a_followed_launch_no_worker_takes_tells_how_to_start_one(real_redis, storage, write_config, tmp_path):
    url, token = real_redis
    config = write_config(f"hint-{token}")
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "HYPERSEARCH_STORAGE")}
    launch = subprocess.Popen([sys.executable, "-m", "master.cli", "launch", "--config", str(config), "--url", url,
                               "--storage", str(storage), "--queue", f"q-{token}", "--wait"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and f"q-{token}" not in "".join(
                lines[next((i for i, line in enumerate(lines) if "no worker has taken" in line), len(lines)):]):
            lines.append(launch.stdout.readline())  # the hint, wrapped at the terminal width
    finally:
        launch.terminate()
        launch.wait(10)
    hint = next((line for line in lines if "no worker has taken a trial" in line), None)
    assert hint is not None, "".join(lines)
    assert f"start one with: worker start --url {url} --storage {storage} --queue q-{token}" in " ".join(
        "".join(lines[lines.index(hint):]).split())


@pytest.mark.parametrize("args, message", [
    (["launch", "--trials", "0"], "Invalid value for '--trials': 0 is not in the range x>=1."),
    (["ensemble", "--top", "0"], "Invalid value for '--top': 0 is not in the range x>=1."),
    (["launch", "--bogus"], "No such option '--bogus'"),
    (["lunch"], "No such command 'lunch'"),
])
def test_a_bad_option_value_or_command_is_one_line_and_exit_2(run, args, message):
    result = run(*args)
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and message in result.output, result.output
