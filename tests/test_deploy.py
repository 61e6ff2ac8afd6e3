"""Static checks of deploy/: YAML parses, compose/k8s/systemd carry the agreed settings, scripts run."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yml", ".yaml"})
SHELL_FILES = sorted(DEPLOY.rglob("*.sh")) + sorted(DEPLOY.rglob("*.sbatch"))
UNIT_FILES = sorted(DEPLOY.rglob("*.service"))


def _rel(p: Path) -> str:
    return str(p.relative_to(DEPLOY))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s_docs() -> list[dict]:
    return [d for p in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in _docs(p)]


def _k8s(kind: str, name: str | None = None) -> dict:
    found = [d for d in _k8s_docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert found, f"no {kind} {name or ''} in deploy/k8s"
    return found[0]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# --- YAML -------------------------------------------------------------------------------

def test_expected_files_exist():
    for rel in ["Dockerfile", "docker-compose.yml", "README.md", "k8s/redis.yaml", "k8s/secret.example.yaml",
                "k8s/checkpoints-pvc.yaml", "k8s/worker.yaml", "k8s/master-job.yaml", "k8s/kustomization.yaml",
                "slurm/worker.sbatch", "slurm/launch.sh", "systemd/hypersearch-worker@.service",
                "systemd/hypersearch-redis.service", "systemd/worker.env.example"]:
        assert (DEPLOY / rel).is_file(), rel


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_yaml_parses(path):
    docs = _docs(path)
    assert docs and all(isinstance(d, dict) for d in docs)


# --- Docker -----------------------------------------------------------------------------

def test_dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    assert "pip install ." in text
    assert not any(ln.startswith("ENTRYPOINT") for ln in lines)
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}
    assert "OPENBLAS_NUM_THREADS=1" in text


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_compose_redis():
    redis = _compose()["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    cmd = " ".join(map(str, redis["command"]))
    assert "--appendonly yes" in cmd
    assert "--requirepass ${REDIS_PASSWORD:?set REDIS_PASSWORD}" in cmd
    health = " ".join(redis["healthcheck"]["test"])
    assert "redis-cli" in health and "ping" in health
    assert "ports" not in redis  # never published by default


@pytest.mark.parametrize("name", ["worker", "master"])
def test_compose_app_services(name):
    compose = _compose()
    svc = compose["services"][name]
    assert "checkpoints:/checkpoints" in svc["volumes"]
    assert "checkpoints" in compose["volumes"]
    assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    url = svc["environment"]["REDIS_URL"]
    assert url == "redis://:${REDIS_PASSWORD:?set REDIS_PASSWORD}@redis:6379/0"
    assert svc["environment"]["OPENBLAS_NUM_THREADS"] == "1"


def test_compose_worker_scalable():
    worker = _compose()["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert worker["command"][:2] == ["worker", "start"]
    assert "--name" not in worker["command"]


def test_compose_master_one_shot():
    master = _compose()["services"]["master"]
    assert master["profiles"] == ["master"] and master["restart"] == "no"
    cmd = master["command"]
    assert cmd[:2] == ["master", "launch"] and "--wait" in cmd
    assert cmd[cmd.index("--storage") + 1] == "/checkpoints"


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        ok = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if ok.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_validates(tmp_path):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is available")
    empty_env = tmp_path / "empty.env"
    empty_env.write_text("")
    base = cli + ["-f", str(DEPLOY / "docker-compose.yml"), "--env-file", str(empty_env)]
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_PASSWORD", "STAGE"}}

    missing = subprocess.run(base + ["config"], env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0
    assert "set REDIS_PASSWORD" in missing.stderr + missing.stdout

    ok = subprocess.run(base + ["--profile", "master", "config"], env={**env, "REDIS_PASSWORD": "s3cret"},
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    services = yaml.safe_load(ok.stdout)["services"]
    assert services["worker"]["environment"]["REDIS_URL"] == "redis://:s3cret@redis:6379/0"
    assert "s3cret" in services["redis"]["command"]
    assert "coarse" in services["master"]["command"]


# --- Kubernetes -------------------------------------------------------------------------

def test_k8s_kinds_present():
    kinds = {d["kind"] for d in _k8s_docs()}
    assert {"StatefulSet", "Service", "Deployment", "Job", "Secret", "PersistentVolumeClaim",
            "Kustomization"} <= kinds


def test_k8s_redis():
    sts = _k8s("StatefulSet", "redis")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    args = " ".join(c["args"])
    assert "--appendonly yes" in args and "--requirepass $(REDIS_PASSWORD)" in args
    assert _env(c)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "hypersearch-redis"
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] in {m["name"] for m in c["volumeMounts"]}
    svc = _k8s("Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None"


def test_k8s_secret_matches_refs():
    secret = _k8s("Secret", "hypersearch-redis")
    assert "password" in secret["stringData"]


def test_k8s_checkpoints_pvc_rwx():
    pvc = _k8s("PersistentVolumeClaim", "hypersearch-checkpoints")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def _pod_checks(pod: dict) -> dict:
    (c,) = pod["containers"]
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert vols[mounts["/checkpoints"]]["persistentVolumeClaim"]["claimName"] == "hypersearch-checkpoints"
    env = _env(c)
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "hypersearch-redis", "key": "password"}
    assert env["REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@redis:6379/0"
    assert env["OPENBLAS_NUM_THREADS"]["value"] == "1"
    assert pod["securityContext"]["runAsNonRoot"] is True
    return c


def test_k8s_worker_deployment():
    dep = _k8s("Deployment", "hypersearch-worker")
    assert dep["spec"]["replicas"] >= 1
    c = _pod_checks(dep["spec"]["template"]["spec"])
    assert c["command"][:2] == ["worker", "start"]
    assert c["resources"]["requests"]["cpu"] == "1" and c["resources"]["limits"]["cpu"] == "1"


def test_k8s_master_job():
    job = _k8s("Job", "hypersearch-master")
    assert job["spec"]["backoffLimit"] >= 0
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in {"Never", "OnFailure"}
    c = _pod_checks(pod)
    assert c["command"][:2] == ["master", "launch"] and "--wait" in c["command"]


def test_k8s_kustomization_resources_exist():
    kust = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    for res in kust["resources"]:
        assert (DEPLOY / "k8s" / res).is_file(), res
    assert "secret.example.yaml" not in kust["resources"]  # never apply the placeholder password


def test_kubectl_kustomize_builds():
    if not shutil.which("kubectl"):
        pytest.skip("kubectl not available")
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(out.stdout) if d}
    assert {"StatefulSet", "Deployment", "PersistentVolumeClaim", "Service"} <= kinds


# --- Shell ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", SHELL_FILES, ids=_rel)
def test_shell_syntax(path):
    out = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert path.stat().st_mode & stat.S_IXUSR, f"{path} is not executable"
    assert "set -euo pipefail" in path.read_text()


@pytest.mark.parametrize("path", SHELL_FILES, ids=_rel)
def test_shellcheck(path):
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck not available")
    out = subprocess.run(["shellcheck", "-S", "warning", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout


def _stub(bindir: Path, name: str, body: str) -> None:
    p = bindir / name
    p.write_text("#!/bin/bash\n" + body + "\n")
    p.chmod(0o755)


def test_slurm_launch_runs_master_then_sbatch(tmp_path):
    bindir, log, storage = tmp_path / "bin", tmp_path / "calls.log", tmp_path / "ckpt"
    bindir.mkdir()
    storage.mkdir()
    for name in ["master", "sbatch"]:
        _stub(bindir, name, f'echo "{name} $* | url=$REDIS_URL storage=$HYPERSEARCH_STORAGE" >> "{log}"')
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "REDIS_URL": "redis://:pw@head:6379/0"}
    env.pop("HYPERSEARCH_STORAGE", None)
    script = DEPLOY / "slurm" / "launch.sh"
    out = subprocess.run([str(script), "-s", "fine", "-d", str(storage), "-N", "3", "-n", "8", "--", "-p", "cpu"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    master, sbatch = log.read_text().splitlines()
    assert master.startswith(f"master launch --stage fine --storage {storage} |")
    assert "pw" not in master.split("|")[0]  # the URL travels in the environment, not argv
    assert "url=redis://:pw@head:6379/0" in master
    assert sbatch.startswith(f"sbatch --nodes=3 --export=ALL --ntasks-per-node=8 -p cpu {script.parent}/worker.sbatch")

    env.pop("REDIS_URL")
    out = subprocess.run([str(script), "-d", str(storage)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "REDIS_URL is not set" in out.stderr and "Usage:" in out.stderr
    out = subprocess.run([str(script), "-h"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "Usage:" in out.stdout


def test_slurm_worker_sbatch_names_workers_per_task(tmp_path):
    bindir, log = tmp_path / "bin", tmp_path / "calls.log"
    bindir.mkdir()
    # srun stand-in: run the command as two tasks, like Slurm would on the allocated cores.
    _stub(bindir, "srun", 'while [[ $1 == --* ]]; do shift; done\n'
                          'for i in 0 1; do SLURM_PROCID=$i "$@"; done')
    _stub(bindir, "worker", f'echo "worker $* | $REDIS_URL $HYPERSEARCH_STORAGE $OPENBLAS_NUM_THREADS" >> "{log}"')
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "REDIS_URL": "redis://:pw@head:6379/0",
           "HYPERSEARCH_STORAGE": str(tmp_path)}
    sbatch = DEPLOY / "slurm" / "worker.sbatch"
    text = sbatch.read_text()
    assert "#SBATCH --cpus-per-task=1" in text and "#SBATCH --ntasks-per-node=" in text
    out = subprocess.run(["bash", str(sbatch)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    lines = log.read_text().splitlines()
    assert [ln.split(" | ")[0] for ln in lines] == [
        f"worker start --name {host}-{i} --threads 1" for i in (0, 1)]
    assert all(ln.endswith(f"| redis://:pw@head:6379/0 {tmp_path} 1") for ln in lines)

    env.pop("REDIS_URL")
    out = subprocess.run(["bash", str(sbatch)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "REDIS_URL must be set" in out.stderr


# --- systemd ----------------------------------------------------------------------------

def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values (systemd allows repeated keys, so configparser is not enough)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not key=value: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.mark.parametrize("path", UNIT_FILES, ids=_rel)
def test_systemd_unit_sections(path):
    unit = _unit(path)
    assert {"Unit", "Service", "Install"} <= unit.keys()
    svc = unit["Service"]
    assert svc["Restart"] == ["on-failure"]
    assert svc["NoNewPrivileges"] == ["yes"] and svc["ProtectSystem"] == ["strict"]
    assert svc["User"][0] != "root"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_worker_unit():
    unit = _unit(DEPLOY / "systemd" / "hypersearch-worker@.service")
    svc = unit["Service"]
    assert re.search(r"(^|/)worker start( |$)", svc["ExecStart"][0]), svc["ExecStart"]
    assert svc["EnvironmentFile"] == ["/etc/hypersearch/worker.env"]
    assert "OPENBLAS_NUM_THREADS=1" in " ".join(svc["Environment"])
    storage = svc["ReadWritePaths"][0]
    assert unit["Unit"]["RequiresMountsFor"] == [storage]
    example = (DEPLOY / "systemd" / "worker.env.example").read_text()
    assert f"HYPERSEARCH_STORAGE={storage}\n" in example and "\nREDIS_URL=redis://" in example


def test_systemd_redis_conf():
    conf = (DEPLOY / "systemd" / "redis.conf").read_text().splitlines()
    assert "appendonly yes" in conf and "maxmemory-policy noeviction" in conf
    assert any(ln.startswith("requirepass ") for ln in conf)
    bind = next(ln for ln in conf if ln.startswith("bind "))
    assert "0.0.0.0" not in bind and "*" not in bind


def test_systemd_analyze_verify(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not available")
    paths = []
    for path in UNIT_FILES:
        # ExecStart must point at an existing binary for verify; the venv is not installed here.
        text = path.read_text().replace("/opt/hypersearch/venv/bin/worker", shutil.which("true") or "/bin/true")
        (tmp_path / path.name).write_text(text)
        paths.append(str(tmp_path / path.name))
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", *paths], capture_output=True, text=True,
                         timeout=60)
    if out.returncode != 0 and "Failed to" in out.stderr and "manager" in out.stderr.lower():
        pytest.skip(f"systemd-analyze verify cannot run here: {out.stderr.strip()[:200]}")
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "", out.stderr
