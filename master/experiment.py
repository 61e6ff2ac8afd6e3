"""An experiment already in shared storage: open it, its config and its Redis, watch findings, and stop a trial.

The read-only commands (status, report, watch, kill) and the Python API start here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from master import dispatch
from master.budget import planned_config
from master.config import ConfigError, ExperimentConfig, parse_config
from master.embedded import running_server_url
from master.monitor import failing_workers, request_stop, worker_outcomes
from master.stages import border_flags, flag_messages, launched_stages, stage_space
from worker.records import TrialResult
from worker.spec import NAME_RE, TrialSpec
from worker.states import StageStatus, TrialState
from worker.store import ExperimentStore, list_experiments, storage_root

POLL_SECONDS = 0.3


class ExperimentError(LookupError):
    """No such experiment or trial, or nothing to act on: the message names it."""


def open_experiment(storage: str | Path | None, experiment: str | None) -> ExperimentStore:
    """The named experiment (default: the most recently changed one) of the storage root."""
    root = storage_root(storage)
    if experiment is None:
        found = list_experiments(root)
        if not found:
            raise ExperimentError(f"storage {root}: no experiment found (launch one with `master launch`)")
        experiment = found[0]
    store = ExperimentStore(root, experiment)
    if store.read_experiment() is None:
        known = ", ".join(list_experiments(root)) or "none"
        raise ExperimentError(f"experiment {experiment}: not found in {root} (experiments there: {known})")
    return store


def experiment_config(store: ExperimentStore) -> ExperimentConfig:
    """The config an experiment was launched with (the TOML text kept in experiment.json; a budget's sized stages)."""
    record = store.read_experiment()
    if record is None:
        raise ExperimentError(f"experiment {store.experiment}: {store.dir}/experiment.json is unreadable")
    try:
        return planned_config(parse_config(record.config_text, f"{store.dir}/experiment.json"), record)
    except ConfigError as exc:
        raise ExperimentError(f"experiment {store.experiment}: {store.dir}/experiment.json has no readable config "
                              f"({exc})") from None


def stage_order(store: ExperimentStore, seen: Iterable[str]) -> list[str]:
    """The stages of ``seen`` in the order the experiment's config lists them, then any other by name."""
    try:
        known = [stage.name for stage in experiment_config(store).stages]
    except ExperimentError:
        known = []
    seen = set(seen)
    return [s for s in known if s in seen] + sorted(seen - set(known))


def redis_of(store: ExperimentStore, url: str | None) -> str | None:
    """The Redis to use for ``store``: ``url``, else $REDIS_URL, else a running launch's embedded Redis."""
    return dispatch.redis_url(url) or running_server_url(store.local_dir)


def open_dispatcher(store: ExperimentStore, url: str | None, queue: str) -> tuple[dispatch.Dispatcher, str]:
    """A dispatcher on the experiment's Redis (see redis_of) and its masked URL."""
    url = redis_of(store, url)
    if url is None:
        raise ExperimentError("no Redis to watch: give --url or $REDIS_URL (or run this while `master launch` runs "
                              "its embedded Redis)")
    return dispatch.Dispatcher(dispatch.connect(url), queue), dispatch.mask_url(url)


def live_dispatcher(store: ExperimentStore, url: str | None, queue: str) -> tuple[dispatch.Dispatcher | None, str]:
    """A dispatcher on the experiment's Redis (see redis_of) and "", or None and why storage alone is shown."""
    url = redis_of(store, url)
    if url is None:
        return None, "no Redis given (--url / $REDIS_URL): showing shared storage only"
    try:
        return dispatch.Dispatcher(dispatch.connect(url), queue), ""
    except dispatch.DispatchError as exc:
        return None, f"Redis unreachable, showing shared storage only ({exc})"


def live_progress(dispatcher: dispatch.Dispatcher | None, experiment: str) -> tuple[Any, Any, str]:
    """(live progress by trial, workers, "") from Redis; (None, None, why) when there is none or it went away."""
    if dispatcher is None:
        return None, None, ""
    try:
        return dispatcher.progress(experiment), dispatcher.workers(), ""
    except dispatch.RedisError as exc:
        return None, None, f"Redis unreachable, showing shared storage only ({exc})"


def job_counts(dispatcher: dispatch.Dispatcher | None, experiment: str) -> dict[str, int]:
    """How many of the experiment's RQ jobs are queued, started, finished, failed, stopped ({} without Redis)."""
    if dispatcher is None:
        return {}
    try:
        return dispatcher.counts(experiment)
    except dispatch.RedisError:
        return {}


def watch_findings(store: ExperimentStore, config: ExperimentConfig) -> list[tuple[str, str]]:
    """("quarantine" | "flag", message) for each quarantined worker and, per launched stage, each border flag of
    its trials finished so far (as recorded once the stage completed)."""
    stages = launched_stages(store, config)
    ids = [tid for record in stages for tid in record.trial_ids]
    out = []
    for worker, (at, reason) in failing_workers(worker_outcomes(store, ids), config.watch.fail_streak).items():
        when = datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="seconds")
        out.append(("quarantine", f"quarantined worker {worker}: its last {config.watch.fail_streak} jobs failed "
                                  f"(last at {when}: {reason})"))
    for record in stages:
        live = record.status is not StageStatus.COMPLETED
        messages = flag_messages(border_flags(store, config, record.stage),
                                 stage_space(store, config, record.stage)) if live else record.flag_messages
        out += [("flag", f"border ({record.stage}{', so far' if live else ''}): {m}") for m in messages]
    return out


@dataclass(frozen=True)
class Killed:
    """How a kill ended: the trial's outcome (None when it was not running: it stops when a worker takes it),
    and whether RQ's stop-job command had to follow."""

    result: TrialResult | None
    forced: bool


def kill_trial(store: ExperimentStore, trial: str, reason: str, url: str | None, queue: str) -> Killed:
    """Stop ``trial``: a stop request the worker honours between two batches (keeping its checkpoints), then RQ's
    stop-job command if it still runs after [watch] stop_grace seconds."""
    config = experiment_config(store)
    raw = store.read_spec(trial) if NAME_RE.match(trial) else None
    if raw is None:
        raise ExperimentError(f"trial {trial}: not in experiment {store.experiment} (see master status)")
    result = store.read_result(trial)
    if result is not None and result.terminal:
        raise ExperimentError(f"trial {trial}: already finished ({result.state.value}); nothing to stop")
    dispatcher, _ = open_dispatcher(store, url, queue)
    request_stop(store, dispatcher, TrialSpec.from_dict(raw), TrialState.KILLED, reason)
    if not dispatcher.jobs(store.experiment, [trial])[trial].running:
        return Killed(None, False)
    result = wait_for_result(store, trial, config.watch.stop_grace)
    forced = result is None and dispatcher.stop_job(store.experiment, trial)
    if forced:
        result = wait_for_result(store, trial, config.watch.stop_grace)
    if result is None:
        raise ExperimentError(f"trial {trial}: stop requested but no result yet; see master status")
    return Killed(result, forced)


def wait_for_result(store: ExperimentStore, trial: str, seconds: float) -> TrialResult | None:
    """The trial's outcome once it appears within ``seconds``, else None."""
    deadline = time.monotonic() + seconds
    while True:
        result = store.read_result(trial)
        if result is not None and result.terminal:
            return result
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL_SECONDS)
