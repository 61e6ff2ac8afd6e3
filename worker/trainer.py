"""Run one trial: build its data and model, train with a checkpoint every epoch, resume, report, obey stops."""
from __future__ import annotations

import errno
import itertools
import logging
import time
from typing import Any, Callable

from nncore.data import load_dataset_cached
from nncore.model import build_model
from nncore.sanity import run_sanity_checks
from nncore.solver import Solver
from worker.control import StopJob, stopped_as
from worker.records import TrialResult
from worker.spec import TrialSpec
from worker.states import TrialState
from worker.store import ExperimentStore

log = logging.getLogger(__name__)

SOLVER_STATES = {"completed": TrialState.COMPLETED, "diverged": TrialState.DIVERGED, "stopped": TrialState.KILLED}
STORAGE_FAULTS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT})  # storage's fault, not the trial's or ours
HANDED_BACK = "handed back"  # the event of a trial its shutting-down worker recorded QUEUED
REFUSED = "refused"  # the reason's start of a job refused for its input: not the worker's fault, never retried
PAUSE_SECONDS = (1.0, 2.0, 5.0, 10.0)  # back-off while storage is full or read-only (then every 10 s)


def persist(write: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Make one storage write. While storage is full or read-only, pause (say why in one line, back off, try
    again) instead of failing the trial: the fault is the storage's, so it must neither count against the worker
    nor drain the queue. Other errors are raised."""
    for attempt in itertools.count():
        try:
            return write(*args, **kwargs)
        except OSError as exc:
            if exc.errno not in STORAGE_FAULTS:
                raise
            pause = PAUSE_SECONDS[min(attempt, len(PAUSE_SECONDS) - 1)]
            log.warning("storage full or read-only (%s): paused, next try in %g s", exc, pause)
            time.sleep(pause)


class _StopCheck:
    """The Solver's should_stop: asks the control plane and remembers the reason it was given."""

    def __init__(self, control: Any):
        self.control = control
        self.reason: str | None = None

    def __call__(self) -> bool:
        self.reason = self.control.should_stop()
        return self.reason is not None


def dataset_refusal(spec: TrialSpec, store: ExperimentStore) -> str | None:
    """Why the job must not read its dataset: a dataset other than the one its experiment declares (a job
    enqueued around the master must not make a worker read an arbitrary file); None when it may."""
    record = store.read_experiment()
    declared = (record.config.get("experiment") or {}).get("dataset") if record is not None else None
    if declared is None or spec.dataset == declared:
        return None
    return f"{REFUSED}: dataset {spec.dataset!r} is not the one experiment {store.experiment} declares ({declared!r})"


def run_trial(spec: TrialSpec, store: ExperimentStore, control: Any, worker_name: str = "local") -> TrialResult:
    """Train ``spec`` to its epoch budget (resuming from its own or its parent's latest checkpoint) and
    return its final record; each write is allowed by ``control.confirm()`` right before its rename or append.
    An exception is recorded as FAILED (StopJob as KILLED) and re-raised; TrialLost
    (``control`` found the trial's job taken from this worker) ends it at once, writing nothing more."""
    started = time.perf_counter()
    store = store.fenced(control.confirm)  # ownership checked right before each rename or append
    tid = spec.trial_id
    spec_dict = spec.to_dict()
    if store.read_spec(tid) != spec_dict:
        persist(store.write_spec, spec_dict)
    persist(store.transition, tid, TrialState.RUNNING, f"running on {worker_name}", "started",
            worker=worker_name)
    for stale in store.remove_temp_files(tid):  # a worker killed mid-write left it; the trial is ours now
        log.info("trial %s: removed %s, left by an interrupted write", tid, stale.name)
    control.report({"state": TrialState.RUNNING.value, "epochs": spec.epochs, "reason": ""})
    solver = None
    sanity: list[dict[str, Any]] | None = None

    def finish(state: TrialState, reason: str) -> TrialResult:
        return _finish(spec, store, control, solver, state, reason, worker_name, time.perf_counter() - started, sanity)

    refused = dataset_refusal(spec, store)
    if refused is not None:
        log.warning("trial %s %s", tid, refused)
        return finish(TrialState.FAILED, refused)
    try:
        data = load_dataset_cached(spec.dataset, **spec.data)
        if spec.sanity:
            sanity = [{"name": r.name, "ok": bool(r.ok), "value": float(r.value), "message": r.message}
                      for r in run_sanity_checks(spec.model, spec.solver, data, seed=spec.seed)]
            failed = [r for r in sanity if not r["ok"]]
            if failed:
                return finish(TrialState.FAILED, f"sanity check {failed[0]['name']} failed: {failed[0]['message']}")
        model = build_model(spec.model, data.input_shape, data.num_classes, seed=spec.seed)
        stop = _StopCheck(control)
        solver = Solver(model, data, spec.solver, seed=spec.seed, should_stop=stop)
        solver.callback = lambda metrics: _end_of_epoch(spec, store, control, solver, metrics)
        start_epoch = _restore(spec, store, solver)
        if start_epoch:
            control.report({"epoch": start_epoch})
            log.info("trial %s: resuming at epoch %d of %d", tid, start_epoch, spec.epochs)
        outcome = solver.train()
    except StopJob as exc:
        finish(*stopped_as(control.should_stop() or str(exc)))
        raise
    except Exception as exc:
        finish(TrialState.FAILED, f"{type(exc).__name__}: {exc}")
        raise
    state = SOLVER_STATES[outcome["status"]]
    if state is TrialState.KILLED and stop.reason:
        return finish(*stopped_as(stop.reason))
    return finish(state, outcome["reason"])


def _restore(spec: TrialSpec, store: ExperimentStore, solver: Solver) -> int:
    """Load the trial's latest checkpoint, or its parent's (copying the parent's history up to it) when it
    has none; trim history records past the restored epoch. Returns the epoch training resumes after."""
    tid = spec.trial_id
    own = store.latest_checkpoint(tid)
    history = current = store.read_history(tid)
    if own is not None:
        solver.load_state_arrays(store.read_checkpoint(own)[0])
        epoch = own.epoch
    elif spec.parent is not None and (parent := store.latest_checkpoint(spec.parent)) is not None:
        solver.load_state_arrays(store.read_checkpoint(parent)[0])
        epoch = parent.epoch
        history = store.read_history(spec.parent)
        persist(store.write_checkpoint, tid, epoch, parent.val_acc, solver.state_arrays(), spec.keep,
                spec.to_dict())
        log.info("trial %s: starting from parent %s at epoch %d", tid, spec.parent, epoch)
    else:
        if spec.parent is not None:
            log.warning("trial %s: parent %s has no checkpoint; training from scratch", tid, spec.parent)
        epoch = 0
    kept = [r for r in history if r["epoch"] <= epoch]
    if kept != current:
        persist(store.write_history, tid, kept)
    return epoch


def _end_of_epoch(spec: TrialSpec, store: ExperimentStore, control: Any, solver: Solver,
                  metrics: dict[str, Any]) -> None:
    """Persist one finished epoch (history line, then checkpoint), the trial still being ours, and publish it."""
    epoch = metrics["epoch"]
    persist(store.append_history, spec.trial_id, {**metrics, "time": time.time()})
    persist(store.write_checkpoint, spec.trial_id, epoch, metrics["val_acc"], solver.state_arrays(),
            spec.keep, spec.to_dict())
    control.report({
        "epoch": epoch, "train_loss": metrics["train_loss"], "last_loss": metrics["train_loss"],
        "initial_loss": solver.initial_loss, "train_acc": metrics["train_acc"], "val_acc": metrics["val_acc"],
        "best_val_acc": round(solver.best_val_acc, 4), "samples_per_sec": metrics["samples_per_sec"],
    })


def _finish(spec: TrialSpec, store: ExperimentStore, control: Any, solver: Solver | None, state: TrialState,
            reason: str, worker_name: str, seconds: float, sanity: list[dict[str, Any]] | None) -> TrialResult:
    """Record the trial's outcome (best = the best checkpoint on disk, so its name, history and result agree),
    the trial still being ours; QUEUED hands it back (its worker is shutting down), to resume elsewhere."""
    best = next(iter(store.checkpoints(spec.trial_id)), None)
    event = "finished" if state.terminal else HANDED_BACK
    result = persist(
        store.transition, spec.trial_id, state, reason, event, worker=worker_name,
        best_val_acc=best.val_acc if best else 0.0, best_epoch=best.epoch if best else 0,
        epochs_done=solver.epoch if solver is not None else 0, seconds=round(seconds, 6),
        checkpoint=best.path.name if best else None, sanity=sanity)
    control.report({"state": state.value, "reason": reason, "best_val_acc": result.best_val_acc,
                    "epoch": result.epochs_done})
    log.info("trial %s: %s (%s) best val %.4f at epoch %d in %.2fs", spec.trial_id, state.value, reason,
             result.best_val_acc, result.best_epoch, seconds)
    return result
