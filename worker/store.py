"""The shared-storage layout of an experiment (the only code that knows its file names), its typed records,
atomic writes, checkpoint names, and the one function that moves a trial or a stage between states."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import json
import logging
import os
import re
import tempfile
import time
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from nncore.io import atomic_write, atomic_write_npz, check_npz_sizes
from worker.records import ExperimentRecord, RecordError, StageRecord, TrialResult
from worker.spec import check_name
from worker.states import StageStatus, TrialState, check_stage_transition, check_trial_transition

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^val(?P<acc>[01]\.\d{4})_ep(?P<epoch>\d{3,})\.npz$")
DEFAULT_STORAGE = "checkpoints"
SPEC_ARRAY = "__spec__"  # every checkpoint carries its trial's spec as a JSON string (a 0-d unicode array)
LOCAL_DIR = "local"  # <experiment>/local: the embedded Redis's data dir, its pidfile and the local workers' logs


class StorageError(OSError):
    """Shared storage is missing, unwritable or holds a file that cannot be read; names the path."""


def storage_root(path: str | os.PathLike[str] | None = None) -> Path:
    """The storage root: ``path``, else ``$HYPERSEARCH_STORAGE``, else ``./checkpoints``."""
    return Path(path or os.environ.get("HYPERSEARCH_STORAGE") or DEFAULT_STORAGE)


def now_iso() -> str:
    """The current UTC time as ISO 8601 to the second (stage and experiment records)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def probe_writable(directory: Path, root: Path | None = None) -> None:
    """StorageError "storage <root>: not writable (...)" unless a file can be created in ``directory`` (an
    unnamed temp file where the OS allows, removed either way, so nothing is left behind)."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise storage_error(f"storage {root or directory}: not writable ({exc.strerror or exc})", exc) from None


def storage_error(message: str, cause: OSError) -> StorageError:
    """A StorageError saying ``message`` that keeps ``cause``'s errno (a full or read-only storage is told apart)."""
    error = StorageError(message)
    error.errno = cause.errno
    return error


Fence = Callable[[], None]  # runs right before a trial file is replaced or appended to; raises to forbid it


def atomic_write_bytes(path: Path, data: bytes, fence: Fence | None = None) -> None:
    """Write ``data`` to ``path`` atomically (``fence`` right before the rename)."""
    atomic_write(path, lambda f: f.write(data), fence)


def atomic_write_json(path: Path, obj: Any, fence: Fence | None = None) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (``fence`` right before the rename)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode(), fence)


_warned: set[tuple[str, int, int]] = set()  # (path, size, mtime) of the corrupt files already named in a warning


def warn_corrupt(path: Path, message: str, *args: Any) -> None:
    """Log ``message`` (naming ``path``) once per version of the file: a watch reads it again every tick."""
    try:
        st = os.stat(path)
        key = (str(path), st.st_size, st.st_mtime_ns)
    except OSError:
        key = (str(path), -1, -1)
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``; None (with a warning naming the file) when it is missing or corrupt."""
    try:
        return json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        warn_corrupt(path, "skipping unreadable %s: %s", path, exc)
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file ([] when missing); a corrupt line is skipped with a warning."""
    try:
        lines = Path(path).read_bytes().splitlines()
    except FileNotFoundError:
        return []
    except OSError as exc:
        warn_corrupt(path, "skipping unreadable %s: %s", path, exc)
        return []
    records, corrupt = [], []
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except ValueError:  # UnicodeDecodeError too
            corrupt.append(n)
            continue
        if isinstance(rec, dict):
            records.append(rec)
    if corrupt:
        shown = ", ".join(map(str, corrupt[:5])) + (", ..." if len(corrupt) > 5 else "")
        warn_corrupt(path, "skipping %d corrupt line(s) of %s (line %s)", len(corrupt), path, shown)
    return records


def _json_line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, sort_keys=True, allow_nan=False) + "\n").encode()


def write_jsonl(path: Path, records: list[dict[str, Any]], fence: Fence | None = None) -> None:
    """Write one JSON object per line, atomically."""
    atomic_write_bytes(path, b"".join(map(_json_line, records)), fence)


def append_jsonl(path: Path, record: dict[str, Any], fence: Fence | None = None) -> None:
    """Append one JSON line, flushed and fsynced (one write of a whole line: a reader sees it whole or not at
    all, and a torn last line after a crash is skipped as corrupt); ``fence`` right before the write."""
    line = _json_line(record)
    if fence is not None:
        fence()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        try:
            if os.write(fd, line) != len(line):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):  # a torn line would glue itself to the next one appended
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file, never unpickling; StorageError naming the file when it is corrupt."""
    try:
        check_npz_sizes(path)
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, MemoryError) as exc:
        raise StorageError(f"{path}: unreadable checkpoint ({exc})") from None


def _record(kind: Any, path: Path) -> Any | None:
    """The typed record ``kind`` stored in ``path``; None when missing, or (with a warning naming the file) when
    it is not such a record."""
    doc = read_json(path)
    if doc is None:
        return None
    try:
        return kind.from_dict(doc)
    except RecordError as exc:
        warn_corrupt(path, "skipping %s: not a %s (%s)", path, kind.__name__, exc)
        return None


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
        self.local_dir = self.dir / LOCAL_DIR
        self.fence: Fence | None = None  # see fenced()

    def fenced(self, fence: Fence) -> ExperimentStore:
        """This store, writing each trial file only after ``fence()`` (called right before the rename or the
        append) allowed it: a worker passes its ownership check, so a run that lost its trial writes nothing."""
        clone = copy.copy(self)
        clone.fence = fence
        return clone

    def ensure(self) -> ExperimentStore:
        """Create the folders; StorageError naming the path when storage is missing or unwritable."""
        try:
            for d in (self.trials_dir, self.stages_dir):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error(f"storage {self.root}: not writable ({exc.strerror or exc})", exc) from None
        probe_writable(self.dir, self.root)
        return self

    # experiment and stages -------------------------------------------------------------
    def write_experiment(self, record: ExperimentRecord) -> None:
        atomic_write_json(self.dir / "experiment.json", record.to_dict())

    def read_experiment(self) -> ExperimentRecord | None:
        return _record(ExperimentRecord, self.dir / "experiment.json")

    def stage_path(self, stage: str) -> Path:
        return self.stages_dir / f"{check_name(stage, 'stage')}.json"

    def write_stage(self, record: StageRecord) -> None:
        """Write a stage record as planned (its status must be one the stage may move to)."""
        old = self.read_stage(record.stage)
        check_stage_transition(record.stage, old.status if old else None, record.status)
        atomic_write_json(self.stage_path(record.stage), record.to_dict())

    def read_stage(self, stage: str) -> StageRecord | None:
        return _record(StageRecord, self.stage_path(stage))

    def stage_names(self) -> list[str]:
        """Names of the stages recorded in stages/ (any order)."""
        return sorted(p.stem for p in self.stages_dir.glob("*.json")) if self.stages_dir.is_dir() else []

    def set_stage_status(self, stage: str, status: StageStatus, **fields: Any) -> StageRecord:
        """The one place a stage moves: check the move, update its record (with ``fields``), stamp the time."""
        record = self.read_stage(stage)
        if record is None:
            raise StorageError(f"stage {stage}: no record in {self.stages_dir}")
        check_stage_transition(stage, record.status, status)
        record = dataclasses.replace(record, status=status, updated_at=now_iso(), **fields)
        atomic_write_json(self.stage_path(stage), record.to_dict())
        return record

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
        atomic_write_json(d / "spec.json", spec, self.fence)

    def read_spec(self, trial_id: str) -> dict[str, Any] | None:
        return read_json(self.trial_dir(trial_id) / "spec.json")

    def read_result(self, trial_id: str) -> TrialResult | None:
        """The trial's state record (None: never queued nor run, or its result.json is unreadable)."""
        return _record(TrialResult, self.trial_dir(trial_id) / "result.json")

    def result_unreadable(self, trial_id: str) -> bool:
        """Whether the trial has a result.json that is not a readable record (corrupt: its state is unknown)."""
        return self.read_result(trial_id) is None and (self.trial_dir(trial_id) / "result.json").exists()

    def transition(self, trial_id: str, to: TrialState, reason: str, event: str, details: dict[str, Any] | None = None,
                   **fields: Any) -> TrialResult:
        """The one function that moves a trial between states: check the move (IllegalTransition otherwise),
        write result.json with ``to``, ``reason`` and the record ``fields`` given (a terminal state stamps
        ``finished_at``), then append ``event`` (with ``details``) to events.jsonl. Returns the new record."""
        current = self.read_result(trial_id)
        check_trial_transition(trial_id, current.state if current else None, to)
        now = time.time()
        base = current or TrialResult(trial_id, to)
        record = dataclasses.replace(base, state=to, reason=reason, updated_at=now,
                                     **{"finished_at": now if to.terminal else None, **fields})
        d = self.trial_dir(trial_id)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(d / "result.json", record.to_dict(), self.fence)
        self.append_event(trial_id, {"time": now, "event": event, "state": to.value, "reason": reason,
                                     **(details or {})})
        return record

    # history -----------------------------------------------------------------------------
    def read_history(self, trial_id: str) -> list[dict[str, Any]]:
        """Per-epoch records in epoch order. The file is append-only: a resumed trial re-runs epochs after its
        last checkpoint and appends them again, so a record of epoch e replaces the records of epochs >= e
        before it. A corrupt line is skipped with a warning naming the file."""
        history: list[dict[str, Any]] = []
        for record in read_jsonl(self.trial_dir(trial_id) / "history.jsonl"):
            if isinstance(record.get("epoch"), int) and not isinstance(record["epoch"], bool):
                while history and history[-1]["epoch"] >= record["epoch"]:
                    history.pop()
                history.append(record)
        return history

    def write_history(self, trial_id: str, records: list[dict[str, Any]]) -> None:
        """Replace the whole history (a resumed trial trims the epochs after its checkpoint)."""
        write_jsonl(self.trial_dir(trial_id) / "history.jsonl", records, self.fence)

    def append_history(self, trial_id: str, record: dict[str, Any]) -> None:
        """Add one epoch's record at the end (one fsynced line; nothing else of the file is rewritten)."""
        append_jsonl(self.trial_dir(trial_id) / "history.jsonl", record, self.fence)

    # events (what happened to a trial and why: queued, started, finished, requeued, stop requested) ---
    def read_events(self, trial_id: str) -> list[dict[str, Any]]:
        return read_jsonl(self.trial_dir(trial_id) / "events.jsonl")

    def append_event(self, trial_id: str, event: dict[str, Any]) -> None:
        """Record an event that is not a move between states (a stop request); transitions record their own."""
        append_jsonl(self.trial_dir(trial_id) / "events.jsonl", event, self.fence)

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

    def write_checkpoint(self, trial_id: str, epoch: int, val_acc: float, arrays: dict[str, np.ndarray], keep: int,
                         spec: dict[str, Any] | None = None) -> Checkpoint:
        """Write one epoch's checkpoint (``arrays``, and the trial's ``spec`` when given) atomically, then keep the
        best ``keep`` plus the latest one."""
        d = self.trial_dir(trial_id)
        d.mkdir(parents=True, exist_ok=True)
        path = d / Checkpoint.filename(val_acc, epoch)
        carried = {SPEC_ARRAY: np.array(json.dumps(spec, sort_keys=True))} if spec is not None else {}
        atomic_write_npz(path, {**arrays, **carried}, self.fence)
        for old in self.checkpoints(trial_id):  # a re-run epoch replaces its earlier file
            if old.epoch == epoch and old.path != path:
                old.path.unlink(missing_ok=True)
        self.prune_checkpoints(trial_id, keep)
        return Checkpoint.parse(path)

    @staticmethod
    def read_checkpoint(checkpoint: Checkpoint) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
        """(the arrays a checkpoint holds, the trial spec it carries or None); StorageError when unreadable."""
        arrays = load_npz(checkpoint.path)
        raw = arrays.pop(SPEC_ARRAY, None)
        try:
            spec = json.loads(raw.item()) if raw is not None else None
        except (ValueError, TypeError):
            raise StorageError(f"{checkpoint.path}: unreadable trial spec in the checkpoint") from None
        return arrays, spec if isinstance(spec, dict) else None

    def remove_temp_files(self, trial_id: str) -> list[Path]:
        """Delete the temp files (``*.tmp``) in the trial's folder, left by a writer killed between writing and
        renaming; call it only while owning the trial. Returns what was removed."""
        d = self.trial_dir(trial_id)
        stale = sorted(d.glob("*.tmp")) if d.is_dir() else []
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    def prune_checkpoints(self, trial_id: str, keep: int) -> None:
        ckpts = self.checkpoints(trial_id)
        latest = max(ckpts, key=lambda c: c.epoch, default=None)
        for c in ckpts[keep:]:
            if c is not latest:
                c.path.unlink(missing_ok=True)

    # ensembles ------------------------------------------------------------------------------
    def ensemble_path(self, name: str) -> Path:
        return self.ensembles_dir / f"{check_name(name, 'ensemble name')}.json"

    def ensemble_names(self) -> list[str]:
        """Names of the experiment's recorded ensembles."""
        return sorted(p.stem for p in self.ensembles_dir.glob("*.json")) if self.ensembles_dir.is_dir() else []

    def write_ensemble(self, record: dict[str, Any]) -> Path:
        self.ensembles_dir.mkdir(parents=True, exist_ok=True)
        path = self.ensemble_path(record["name"])
        atomic_write_json(path, record)
        return path

    def read_ensemble(self, name: str) -> Any | None:
        return read_json(self.ensemble_path(name))

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

    def read_result(self, trial_id: str) -> TrialResult | None:
        return self._once("result", trial_id, super().read_result)

    def read_history(self, trial_id: str) -> list[dict[str, Any]]:
        return self._once("history", trial_id, super().read_history)

    def read_events(self, trial_id: str) -> list[dict[str, Any]]:
        return self._once("events", trial_id, super().read_events)
