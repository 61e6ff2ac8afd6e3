"""The shared-storage layout of an experiment: atomic writes, checkpoint names, scanning."""
from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from nncore.io import atomic_write, atomic_write_npz
from worker.spec import check_name

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^val(?P<acc>[01]\.\d{4})_ep(?P<epoch>\d{3,})\.npz$")
DEFAULT_STORAGE = "checkpoints"


class StorageError(OSError):
    """Shared storage is missing, unwritable or holds a file that cannot be read; names the path."""


def storage_root(path: str | os.PathLike[str] | None = None) -> Path:
    """The storage root: ``path``, else ``$HYPERSEARCH_STORAGE``, else ``./checkpoints``."""
    return Path(path or os.environ.get("HYPERSEARCH_STORAGE") or DEFAULT_STORAGE)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``; None (with a warning naming the file) when it is missing or corrupt."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("skipping unreadable %s: %s", path, exc)
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file ([] when missing); a corrupt line is skipped with a warning."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except ValueError:
            log.warning("skipping corrupt line %d of %s", n, path)
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Write one JSON object per line, atomically."""
    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True, allow_nan=False) + "\n" for r in records).encode())


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file, never unpickling; StorageError naming the file when it is corrupt."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise StorageError(f"{path}: unreadable checkpoint ({exc})") from None


@dataclass(frozen=True, order=True)
class Checkpoint:
    """One checkpoint file; its name carries the validation accuracy and the epoch."""

    val_acc: float
    epoch: int
    path: Path

    @staticmethod
    def filename(val_acc: float, epoch: int) -> str:
        return f"val{min(max(val_acc, 0.0), 1.0):.4f}_ep{epoch:03d}.npz"

    @classmethod
    def parse(cls, path: Path) -> Checkpoint | None:
        m = CHECKPOINT_RE.match(path.name)
        return cls(float(m["acc"]), int(m["epoch"]), path) if m else None


def list_experiments(root: Path) -> list[str]:
    """Names of the experiments under a storage root, newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if (p / "experiment.json").is_file()]
    return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]


class ExperimentStore:
    """Reads and writes one experiment's folder: ``<root>/<experiment>/...``."""

    def __init__(self, root: str | os.PathLike[str], experiment: str):
        self.root = Path(root)
        self.experiment = check_name(experiment, "experiment")
        self.dir = self.root / experiment
        self.trials_dir = self.dir / "trials"
        self.stages_dir = self.dir / "stages"
        self.ensembles_dir = self.dir / "ensembles"
        self.report_dir = self.dir / "report"

    def ensure(self) -> ExperimentStore:
        """Create the folders; StorageError naming the path when storage is missing or unwritable."""
        try:
            for d in (self.trials_dir, self.stages_dir):
                d.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".write-probe-{os.getpid()}.tmp"  # per process: workers share the folder
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StorageError(f"storage {self.root}: not writable ({exc.strerror or exc})") from None
        return self

    # experiment and stages -------------------------------------------------------------
    def write_experiment(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.dir / "experiment.json", config)

    def read_experiment(self) -> dict[str, Any] | None:
        return read_json(self.dir / "experiment.json")

    def write_stage(self, stage: str, record: dict[str, Any]) -> None:
        atomic_write_json(self.stages_dir / f"{check_name(stage, 'stage')}.json", record)

    def read_stage(self, stage: str) -> dict[str, Any] | None:
        return read_json(self.stages_dir / f"{check_name(stage, 'stage')}.json")

    # trials ------------------------------------------------------------------------------
    def trial_dir(self, trial_id: str) -> Path:
        return self.trials_dir / check_name(trial_id, "trial_id")

    def trial_ids(self) -> list[str]:
        if not self.trials_dir.is_dir():
            return []
        return sorted(p.name for p in self.trials_dir.iterdir() if (p / "spec.json").is_file())

    def write_spec(self, spec: dict[str, Any]) -> None:
        d = self.trial_dir(spec["trial_id"])
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(d / "spec.json", spec)

    def read_spec(self, trial_id: str) -> dict[str, Any] | None:
        return read_json(self.trial_dir(trial_id) / "spec.json")

    def write_result(self, trial_id: str, result: dict[str, Any]) -> None:
        atomic_write_json(self.trial_dir(trial_id) / "result.json", result)

    def read_result(self, trial_id: str) -> dict[str, Any] | None:
        return read_json(self.trial_dir(trial_id) / "result.json")

    def clear_result(self, trial_id: str) -> None:
        (self.trial_dir(trial_id) / "result.json").unlink(missing_ok=True)

    # history -----------------------------------------------------------------------------
    def read_history(self, trial_id: str) -> list[dict[str, Any]]:
        """Per-epoch records; a corrupt line is skipped with a warning naming the file."""
        return [r for r in read_jsonl(self.trial_dir(trial_id) / "history.jsonl") if isinstance(r.get("epoch"), int)]

    def write_history(self, trial_id: str, records: list[dict[str, Any]]) -> None:
        write_jsonl(self.trial_dir(trial_id) / "history.jsonl", records)

    def append_history(self, trial_id: str, record: dict[str, Any]) -> None:
        """Add one epoch's record, replacing any record of that epoch or later (a resumed epoch re-run)."""
        kept = [r for r in self.read_history(trial_id) if r["epoch"] < record["epoch"]]
        self.write_history(trial_id, kept + [record])

    # events (what the master did to a trial and why: requeued, retried, stop requested) ---------
    def read_events(self, trial_id: str) -> list[dict[str, Any]]:
        return read_jsonl(self.trial_dir(trial_id) / "events.jsonl")

    def append_event(self, trial_id: str, event: dict[str, Any]) -> None:
        write_jsonl(self.trial_dir(trial_id) / "events.jsonl", self.read_events(trial_id) + [event])

    # checkpoints -------------------------------------------------------------------------
    def checkpoints(self, trial_id: str) -> list[Checkpoint]:
        """The trial's checkpoints, best validation accuracy first (later epoch first on ties)."""
        d = self.trial_dir(trial_id)
        if not d.is_dir():
            return []
        found = (Checkpoint.parse(p) for p in d.iterdir())
        return sorted((c for c in found if c), key=lambda c: (c.val_acc, c.epoch), reverse=True)

    def latest_checkpoint(self, trial_id: str) -> Checkpoint | None:
        return max(self.checkpoints(trial_id), key=lambda c: c.epoch, default=None)

    def write_checkpoint(self, trial_id: str, epoch: int, val_acc: float,
                         arrays: dict[str, np.ndarray], keep: int) -> Checkpoint:
        """Write one epoch's checkpoint atomically, then keep the best ``keep`` plus the latest one."""
        d = self.trial_dir(trial_id)
        d.mkdir(parents=True, exist_ok=True)
        path = d / Checkpoint.filename(val_acc, epoch)
        for old in self.checkpoints(trial_id):  # a re-run epoch replaces its earlier file
            if old.epoch == epoch and old.path != path:
                old.path.unlink(missing_ok=True)
        atomic_write_npz(path, arrays)
        self.prune_checkpoints(trial_id, keep)
        return Checkpoint.parse(path)

    def prune_checkpoints(self, trial_id: str, keep: int) -> None:
        ckpts = self.checkpoints(trial_id)
        latest = max(ckpts, key=lambda c: c.epoch, default=None)
        for c in ckpts[keep:]:
            if c is not latest:
                c.path.unlink(missing_ok=True)

    def drop_checkpoints_after(self, trial_id: str, epoch: int) -> None:
        """Remove checkpoints of epochs after ``epoch`` (used when a trial restarts from an earlier one)."""
        for c in self.checkpoints(trial_id):
            if c.epoch > epoch:
                c.path.unlink(missing_ok=True)

    def snapshot(self) -> StoreSnapshot:
        """A read-only view of this experiment that reads each trial file at most once (see StoreSnapshot)."""
        return StoreSnapshot(self.root, self.experiment)

    def iter_trials(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(trial id, spec) for every trial whose spec is readable."""
        for tid in self.trial_ids():
            spec = self.read_spec(tid)
            if isinstance(spec, dict):
                yield tid, spec


class StoreSnapshot(ExperimentStore):
    """The experiment as one read-only command sees it: the trial list and each trial's spec, result, history
    and events are read from storage once, then served from memory (``master status`` and ``master report``
    look at every trial several times: leaderboard, border flags per stage, quarantine). Files written after
    the first read are not seen; callers must not modify what it returns, and must not write through it."""

    def __init__(self, root: str | os.PathLike[str], experiment: str):
        super().__init__(root, experiment)
        self._read: dict[tuple[str, str], Any] = {}

    def _once(self, kind: str, key: str, read: Any) -> Any:
        if (kind, key) not in self._read:
            self._read[kind, key] = read(key)
        return self._read[kind, key]

    def trial_ids(self) -> list[str]:
        return list(self._once("trial_ids", "", lambda _: super(StoreSnapshot, self).trial_ids()))

    def read_spec(self, trial_id: str) -> dict[str, Any] | None:
        return self._once("spec", trial_id, super().read_spec)

    def read_result(self, trial_id: str) -> dict[str, Any] | None:
        return self._once("result", trial_id, super().read_result)

    def read_history(self, trial_id: str) -> list[dict[str, Any]]:
        return self._once("history", trial_id, super().read_history)

    def read_events(self, trial_id: str) -> list[dict[str, Any]]:
        return self._once("events", trial_id, super().read_events)
