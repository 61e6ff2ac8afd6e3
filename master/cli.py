"""The ``master`` command line: launch and follow stages, watch and kill trials, status, report, ensemble, predict."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Callable, Iterator

import click
import redis
from rich.console import Console, Group
from rich.live import Live
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from master import dispatch
from master.embedded import EmbeddedError, EmbeddedRedis, LocalWorkers, redis_server_binary, running_server_url
from master.ensemble import METHODS as ENSEMBLE_METHODS, EnsembleError, build_ensemble, render_ensemble
from master.ensemble import predict as run_prediction
from master.leaderboard import build_leaderboard, render_table
from master.borders import range_text
from master.monitor import (Event, Monitor, close_stage, failing_workers, launched_stages, move, next_look, now_iso,
                            worker_outcomes)
from master.monitor import watch as watch_loop
from master.space import DEFAULT_CONFIG, ExperimentConfig, SpaceError, load_config, parse_config
from master.stages import (StagePlan, border_flags, flag_messages, plan_stage, previous_stage, stage_space,
                           stage_status)
from nncore.data import load_dataset
from nncore.errors import ConfigError, DataError
from worker.spec import NAME_RE, TERMINAL_STATES, SpecError, TrialSpec, TrialState
from worker.store import ExperimentStore, StorageError, list_experiments, storage_root

log = logging.getLogger(__name__)

console = Console(highlight=False)
LOCAL_DIR = "local"  # <experiment>/local: the embedded Redis's data dir, its pidfile and the local workers' logs
POLL_SECONDS = 0.3
INTERRUPTED_REASON = "interrupted by user (Ctrl-C)"
TERMINAL = {s.value for s in TERMINAL_STATES}
EXIT_INTERRUPTED = 130


class CliError(click.ClickException):
    """A problem with the user's input or environment: one line on stderr, exit code 2, nothing written."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


USER_ERRORS = (SpaceError, SpecError, ConfigError, DataError, StorageError, dispatch.DispatchError, EmbeddedError,
               EnsembleError)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors that name a culprit (config key, dataset, storage path, Redis URL) into CliError."""
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as exc:
            raise CliError(str(exc)) from None
    return wrapper


# options shared by several commands, defined once ----------------------------------------
storage_option = click.option(
    "--storage", type=click.Path(path_type=Path, file_okay=True), default=None,
    help="Shared storage root holding the experiments (default: $HYPERSEARCH_STORAGE, else ./checkpoints). "
         "A root given explicitly must already exist.")
url_option = click.option(
    "--url", default=None, metavar="URL",
    help="Redis URL, e.g. redis://:PASSWORD@host:6379/0 (default: $REDIS_URL). Without either, launch runs "
         "an embedded Redis and local workers for the duration of the command.")
queue_option = click.option(
    "--queue", default=dispatch.DEFAULT_QUEUE, show_default=True,
    help="RQ queue the trials go through (workers must listen on the same one).")
experiment_option = click.option(
    "--experiment", default=None, metavar="NAME",
    help="Experiment to show (default: the most recently changed one in the storage root).")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="Log more on stderr (-v: info, -vv: debug).")
def main(verbose: int) -> None:
    """Distributed random hyperparameter search: sample trials, dispatch them over Redis, rank the results."""
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(name)s: %(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False)])


# launch -------------------------------------------------------------------------------------
@main.command()
@click.option("--stage", default=None,
              help="Stage of the config to launch (default: the config's first stage, `coarse` in the built-in "
                   "one). A narrow or promote stage is planned from the previous stage's finished trials.")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Experiment config (TOML): dataset, fixed fields, stages and search space "
                   "(default: the built-in digits MLP search, master/default.toml).")
@url_option
@storage_option
@queue_option
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="Number of trials to sample, or to promote (default: the stage's `trials` in the config).")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Sampling seed (default: the config's experiment.seed); the same config and seed give the "
                   "same trials, so launching again enqueues only what is missing.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Local worker processes to start with the embedded Redis (default: one per CPU core, "
                   "at most one per trial). With --url, start workers with `worker start` instead.")
@click.option("--wait/--no-wait", default=None,
              help="Follow progress until every trial of the stage has finished (always with the embedded "
                   "Redis; with --url the default is to enqueue and return).")
@click.option("--force", is_flag=True,
              help="Launch a stage although the stage before it is unfinished (planned from the trials finished "
                   "so far); also enqueue trials that already finished, failed or were stopped (they resume from "
                   "their checkpoints). Trials queued or running are never enqueued twice.")
@click.option("--all", "all_stages", is_flag=True,
              help="Run every stage of the config in order, each followed to its end before the next is planned "
                   "(stages already completed are skipped); with --url, workers must be running.")
@user_errors
def launch(stage: str | None, config_path: Path | None, url: str | None, storage: Path | None, queue: str,
           trials: int | None, seed: int | None, workers: int | None, wait: bool | None, force: bool,
           all_stages: bool) -> None:
    """Plan a stage's trials, record them in shared storage and enqueue them, one RQ job per trial.

    The first stage samples the search space at random; a narrow stage samples ranges narrowed around the
    previous stage's best trials (printed old -> new, with the previous stage's border flags); a promote stage
    continues the previous stage's best trials from their last checkpoints. A later stage is refused while the
    one before it is unfinished (--force overrides). Launching again after a crash or Ctrl-C resumes the stage:
    nothing is enqueued twice, nothing is lost, interrupted trials continue from their last checkpoints. With
    no Redis URL, runs everything on this machine: an embedded Redis, local workers, a progress bar, then the
    leaderboard. Everything is validated before anything is written.
    """
    config = load_config(config_path)
    url = dispatch.redis_url(url)
    embedded = url is None
    if embedded and wait is False:
        raise CliError("--no-wait needs --url or $REDIS_URL: the embedded Redis lives only while launch runs")
    if not embedded and workers is not None:
        raise CliError("--workers starts local workers for the embedded Redis only; with --url, run "
                       "`worker start --url ...` on the worker machines")
    if all_stages and (stage is not None or trials is not None or wait is False):
        raise CliError("--all runs every stage with its configured trials to the end; "
                       "drop --stage, --trials and --no-wait")
    root = storage_root(storage)
    store = ExperimentStore(root, config.name)
    check_storage(root, store, must_exist=storage is not None or "HYPERSEARCH_STORAGE" in os.environ)
    dispatcher = None if embedded else dispatch.Dispatcher(dispatch.connect(url), queue, storage=root)
    names = [s.name for s in config.stages] if all_stages else [stage or config.stages[0].name]
    for name in names:
        if all_stages and stage_completed(store, config, name):
            console.print(f"stage [bold]{name}[/] already completed")
            continue
        code = launch_stage(store, config, config_path, name, seed, trials, dispatcher, url, queue, workers,
                            wait=all_stages or bool(wait), force=force)
        if code:
            raise SystemExit(code)
    raise SystemExit(0)


def stage_completed(store: ExperimentStore, config: ExperimentConfig, name: str) -> bool:
    """Whether stage ``name`` has been launched and all its trials have finished (failed ones out of retries)."""
    ids = (store.read_stage(name) or {}).get("trial_ids")
    return bool(ids) and stage_status(store, ids, config.watch.max_retries).finished


def check_previous(store: ExperimentStore, config: ExperimentConfig, name: str) -> None:
    """Refuse a later stage while the stage before it has not been launched or has unfinished trials."""
    before = previous_stage(config, name)
    if before is None or (store.read_stage(name) or {}).get("trial_ids"):  # the first stage, or a resumed one
        return
    ids = (store.read_stage(before.name) or {}).get("trial_ids")
    if not ids:
        raise CliError(f"stage {name}: stage {before.name} before it has not been launched "
                       f"(master launch --stage {before.name}, or --all)")
    status = stage_status(store, ids, config.watch.max_retries)
    if not status.finished:
        raise CliError(f"stage {name}: stage {before.name} before it is unfinished ({status.describe()}); "
                       f"wait for it (master watch) or use --force to plan from its finished trials")


def launch_stage(store: ExperimentStore, config: ExperimentConfig, config_path: Path | None, name: str,
                 seed: int | None, trials: int | None, dispatcher: dispatch.Dispatcher | None, url: str | None,
                 queue: str, workers: int | None, wait: bool, force: bool) -> int:
    """Plan, record and run one stage (embedded when ``dispatcher`` is None); returns the exit code."""
    if not force:
        check_previous(store, config, name)
    plan = plan_stage(store, config, name, seed, trials)
    if not plan.specs:
        raise CliError(f"stage {plan.stage.name}: nothing to launch ({plan.note})")
    check_existing(store, config, plan.specs)
    if dispatcher is None:  # local workers will read the same files: make sure the dataset loads before writing
        load_dataset(config.dataset, **plan.specs[0].data)
        binary = redis_server_binary()
    record_launch(store, config, config_text(config_path), plan, config.seed if seed is None else seed)
    show_plan(plan)
    specs = list(plan.specs)
    if dispatcher is None:
        return run_embedded(store, config, specs, binary, queue, min(workers or available_cores(), len(specs)), force)
    return run_remote(store, config, specs, dispatcher, dispatch.mask_url(url), force, wait=wait)


def show_plan(plan: StagePlan) -> None:
    """The previous stage's border flags, where the trials come from, and each range old -> new."""
    dists = {old.name: old for old, _ in plan.ranges}
    for flag in plan.flags:
        console.print(f"[yellow]border: {flag.message(dists[flag.name])}[/]")
    if plan.note:
        console.print(plan.note)
    for old, new in plan.ranges:
        change = f"-> {range_text(new)}" if new != old else "(kept: the evidence is weak)"
        console.print(f"  {old.name}: {range_text(old)} {change}")


def run_remote(store: ExperimentStore, config: ExperimentConfig, specs: list[TrialSpec],
               dispatcher: dispatch.Dispatcher, shown_url: str, force: bool, wait: bool) -> int:
    """Enqueue on a Redis the workers share; then return, or follow the stage when ``wait``. Exit code."""
    enqueued = dispatcher.enqueue(specs, force=force)
    skipped = len(specs) - len(enqueued)
    queue, stage = dispatcher.queue.name, specs[0].stage
    console.print(f"enqueued [bold]{len(enqueued)}[/] of {len(specs)} trials of stage [bold]{stage}[/] of "
                  f"[bold]{store.experiment}[/] on {shown_url} (queue {queue})"
                  + (f"; {skipped} already queued or finished" if skipped else ""))
    if not wait:
        console.print(f"workers: worker start --url {shown_url} --storage {store.root} --queue {queue}\n"
                      f"watch:   master status --experiment {store.experiment} --storage {store.root} "
                      f"--url {shown_url}")
        return 0
    try:
        outcome = follow(store, config, dispatcher, specs)
    except KeyboardInterrupt:
        console.print("stopped following; the trials go on on the workers")
        return EXIT_INTERRUPTED
    finish_stage(store, stage, outcome, specs)
    return 0 if outcome == "completed" else 1


def available_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_storage(root: Path, store: ExperimentStore, must_exist: bool) -> None:
    """Refuse a storage root that is missing (when named explicitly), not a directory or not writable,
    without leaving anything in it; the default ``./checkpoints`` is created later if missing."""
    if root.exists() and not root.is_dir():
        raise CliError(f"storage {root}: not a directory")
    if not root.exists() and must_exist:
        raise CliError(f"storage {root}: does not exist (create it, or point --storage at shared storage)")
    probe_dir = next(p for p in (store.dir, root, root.absolute().parent) if p.is_dir())
    try:
        with tempfile.TemporaryFile(dir=probe_dir):  # unnamed where the OS allows; removed either way
            pass
    except OSError as exc:
        raise CliError(f"storage {root}: not writable ({exc.strerror or exc})") from None


def check_existing(store: ExperimentStore, config: ExperimentConfig, specs: list[TrialSpec]) -> None:
    """Refuse to mix two different experiments (or two samplings of one stage) under the same name."""
    previous = store.read_experiment()
    if previous is not None and not same_config(previous, config):
        raise CliError(f"experiment {config.name}: {store.dir} holds a different config; rename the experiment "
                       f"(experiment.name) or use another --storage")
    for spec in specs:
        existing = store.read_spec(spec.trial_id)
        if existing is not None and not same_spec(existing, spec):
            raise CliError(f"trial {spec.trial_id}: already in {store.dir} with different settings "
                           f"(another --seed?); use the original seed or another experiment name")


def same_config(snapshot: Any, config: ExperimentConfig) -> bool:
    """Whether a stored config snapshot describes ``config``, judged by parsing its TOML text with today's
    code (so config fields added since, with their defaults, do not count as a change)."""
    try:
        return parse_config(snapshot["config_text"]) == config
    except (SpaceError, KeyError, TypeError):
        return False


def same_spec(stored: Any, spec: TrialSpec) -> bool:
    """Whether a stored spec.json is ``spec`` (validated with today's defaults, like the config above)."""
    try:
        return TrialSpec.from_dict(stored) == spec
    except SpecError:
        return False


def config_text(path: Path | None) -> str:
    """The TOML the config was loaded from (the built-in default's when ``path`` is None). JSON objects are
    written with sorted keys, so this, not ``config``, keeps the order of the stages and of the space."""
    if path is None:
        return resources.files("master").joinpath(DEFAULT_CONFIG).read_text(encoding="utf-8")
    return Path(path).read_text(encoding="utf-8")


def code_version() -> str:
    """The package version, plus the git commit (and ``.dirty``) when running from a checkout."""
    version = metadata.version("hypersearch")
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{commit}{'.dirty' if dirty else ''}"


def record_launch(store: ExperimentStore, config: ExperimentConfig, text: str, plan: StagePlan, seed: int) -> None:
    """Write experiment.json (once), stages/<stage>.json (ranges sampled, trial ids) and each trial's spec.json."""
    store.ensure()
    if store.read_experiment() is None:
        store.write_experiment({"name": config.name, "config": config.to_dict(), "config_text": text,
                                "seed": config.seed, "created_at": now_iso(), "code_version": code_version()})
    stage = plan.stage.name
    previous = store.read_stage(stage) or {}
    ids = sorted(set(previous.get("trial_ids", [])) | {s.trial_id for s in plan.specs})
    store.write_stage(stage, {
        "stage": stage, "method": plan.stage.method, "epochs": plan.stage.epochs, "seed": seed,
        "ranges": {d.name: d.to_dict() for d in plan.space}, "from_stage": plan.previous, "note": plan.note,
        "trial_ids": ids, "status": "launched", "created_at": previous.get("created_at", now_iso()),
        "updated_at": now_iso(),
    })
    for spec in plan.specs:
        if store.read_spec(spec.trial_id) is None:
            store.write_spec(spec.to_dict())


def finish_stage(store: ExperimentStore, stage: str, outcome: str, specs: list[TrialSpec]) -> None:
    """Record how following the stage ended, then print the leaderboard of the stage."""
    record = store.read_stage(stage) or {}
    store.write_stage(stage, {**record, "status": outcome, "updated_at": now_iso()})
    df = build_leaderboard(store, stage=stage)
    console.print(render_table(df, top=10, title=f"{store.experiment} / {stage}: top {min(10, len(df))} "
                                                   f"of {len(df)} trials (by validation accuracy)"))
    unfinished = [s.trial_id for s in specs if (store.read_result(s.trial_id) or {}).get("state") not in TERMINAL]
    if outcome == "completed":
        console.print(f"stage [bold]{stage}[/] completed; results in {store.dir}")
    else:
        console.print(f"stage [bold]{stage}[/] {outcome}: {len(unfinished)} of {len(specs)} trials unfinished "
                      f"({', '.join(unfinished[:5])}{', ...' if len(unfinished) > 5 else ''}); results in {store.dir}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGHUP clean up like Ctrl-C instead of killing us outright."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_embedded(store: ExperimentStore, config: ExperimentConfig, specs: list[TrialSpec], binary: str,
                 queue: str, workers: int, force: bool) -> int:
    """Run the stage on this machine: embedded Redis (``binary``), enqueue, ``workers`` local workers, follow,
    stop everything started here (also on Ctrl-C), print the leaderboard. Returns the exit code."""
    stage = specs[0].stage
    run_dir = store.dir / LOCAL_DIR
    server = EmbeddedRedis(run_dir, binary=binary)
    pool: LocalWorkers | None = None
    outcome = "interrupted"
    with sigterm_as_interrupt():
        try:
            url = server.start()
            dispatcher = dispatch.Dispatcher(dispatch.connect(url), queue, storage=store.root)
            enqueued = dispatcher.enqueue(specs, force=force)
            if enqueued:
                pool = LocalWorkers(run_dir, url, store.root, queue=queue, count=min(workers, len(enqueued)))
                console.print(f"running {len(enqueued)} trials of stage [bold]{stage}[/] of [bold]{store.experiment}"
                              f"[/] on {pool.count} local workers (embedded Redis, storage {store.root})")
                pool.start()
                outcome = follow(store, config, dispatcher, specs, pool)
            else:
                console.print(f"nothing to run: all {len(specs)} trials of stage {stage} already finished "
                              "(--force runs them again)")
                outcome = "completed"
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: stopping the running trials, the workers and Redis[/]")
            if pool is not None:
                stop_trials(store, dispatcher, specs)
        finally:
            if pool is not None:
                pool.stop()
            server.stop()
    if outcome == "interrupted":
        requeue_interrupted(store, specs)
    finish_stage(store, stage, outcome, specs)
    if outcome == "interrupted":
        console.print("the same command resumes the interrupted trials from their checkpoints")
        return EXIT_INTERRUPTED
    if pool is not None and pool.failed():
        log.warning("local workers exited with codes %s; their logs are in %s", pool.failed(), run_dir)
    return 0 if outcome == "completed" else 1


def stop_trials(store: ExperimentStore, dispatcher: dispatch.Dispatcher, specs: list[TrialSpec]) -> None:
    """Ask every unfinished trial of ``specs`` to stop (honoured within about a second), with the reason."""
    for spec in specs:
        if (store.read_result(spec.trial_id) or {}).get("state") not in TERMINAL:
            try:
                move(store, dispatcher, spec, TrialState.KILLED, INTERRUPTED_REASON, "stop")
            except redis.RedisError as exc:
                log.warning("cannot request a stop of %s: %s", spec.trial_id, exc)
                return


def requeue_interrupted(store: ExperimentStore, specs: list[TrialSpec]) -> None:
    """Trials that stopped because the user interrupted the launch are unfinished, not killed: their results
    go back to QUEUED (the reason kept), so launching again resumes them from their checkpoints."""
    for spec in specs:
        result = store.read_result(spec.trial_id) or {}
        if result.get("state") == TrialState.KILLED.value and result.get("reason") == INTERRUPTED_REASON:
            store.write_result(spec.trial_id, {**result, "state": TrialState.QUEUED.value})
            store.append_event(spec.trial_id, {"time": time.time(), "event": "interrupted",
                                               "state": TrialState.QUEUED.value, "reason": INTERRUPTED_REASON})


def follow(store: ExperimentStore, config: ExperimentConfig, dispatcher: dispatch.Dispatcher,
           specs: list[TrialSpec], pool: LocalWorkers | None = None) -> str:
    """Show a progress bar and the best trial so far while the watch loop (master.monitor: stop bad trials,
    requeue lost ones, retry failed ones) runs every ``[watch] poll_seconds``, until every trial of the stage
    has finished ("completed"; failed ones out of retries), or every local worker has exited ("incomplete").
    Looking takes at most master.monitor.WATCH_DUTY of the time: with many trials, it looks less often."""
    ids = [s.trial_id for s in specs]
    stage = specs[0].stage
    monitor = Monitor(store, config, dispatcher)
    next_watch = 0.0
    final: dict[str, dict[str, Any]] = {}  # results no retry replaces, read once (a large stage has many)
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("{task.fields[detail]}"), console=console)
    task = progress.add_task(f"{store.experiment}/{stage}", total=len(ids), detail="")
    best = Text("best so far: -")
    with end_line_when_piped(), Live(Group(progress, best), console=console, refresh_per_second=4):
        while True:
            looked = time.monotonic()
            # asked before reading results, so a worker that finished the last trial and quit counts as done
            stranded = pool is not None and pool.alive() == 0
            try:
                if time.monotonic() >= next_watch:
                    next_watch = time.monotonic() + config.watch.poll_seconds
                    show_events(monitor.tick())
                live = dispatcher.progress(store.experiment)
            except redis.RedisError as exc:
                log.warning("cannot reach Redis this time: %s", exc)
                live = {}
            done = dict(final)
            for tid in ids:
                if tid not in final and (result := store.read_result(tid) or {}).get("state") in TERMINAL:
                    done[tid] = result
                    if result["state"] != TrialState.FAILED.value:
                        final[tid] = result
            running = sum(1 for tid in ids if tid not in done and live.get(tid, {}).get("state") == "RUNNING")
            progress.update(task, completed=len(done), detail=f"{running} running")
            best.plain = best_line(done, live, ids)
            if len(done) == len(ids) and (status := stage_status(store, ids, config.watch.max_retries)).finished:
                show_events(close_stage(store, config, stage, status.describe()))
                return "completed"
            if stranded:
                return "incomplete"
            time.sleep(next_look(POLL_SECONDS, time.monotonic() - looked))


def show_events(events: list[Event]) -> None:
    """What the watch loop did (stops, requeues, retries, border flags), one line each above the progress."""
    for event in events:
        console.print(f"[dim]{event.message}[/]" if event.kind != "flag" else f"[yellow]{event.message}[/]")


@contextlib.contextmanager
def end_line_when_piped() -> Iterator[None]:
    """Rich's Live leaves its last line open when output is not a terminal; close it on the way out."""
    try:
        yield
    finally:
        if not console.is_terminal:
            console.line()


def best_line(done: dict[str, dict[str, Any]], live: dict[str, dict[str, Any]], ids: list[str]) -> str:
    """"best so far: <trial> val 0.9612 (epoch 1, COMPLETED)" over finished results and live progress."""
    candidates = []
    for tid in ids:  # in id order, so the first of equally good trials wins
        if tid in done:
            r = done[tid]
            candidates.append((float(r.get("best_val_acc") or 0.0), tid, r.get("best_epoch"), r["state"]))
        elif isinstance(live.get(tid, {}).get("best_val_acc"), (int, float)):
            p = live[tid]
            candidates.append((float(p["best_val_acc"]), tid, p.get("epoch"), p.get("state", "RUNNING")))
    if not candidates:
        return "best so far: -"
    acc, tid, epoch, state = max(candidates, key=lambda c: c[0])
    return f"best so far: {tid} val {acc:.4f} (epoch {epoch}, {state})"


# status -------------------------------------------------------------------------------------
def open_experiment(storage: Path | None, experiment: str | None) -> ExperimentStore:
    """The named experiment (default: the most recently changed one) of the storage root; CliError if absent."""
    root = storage_root(storage)
    if experiment is None:
        found = list_experiments(root)
        if not found:
            raise CliError(f"storage {root}: no experiment found (launch one with `master launch`)")
        experiment = found[0]
    store = ExperimentStore(root, experiment)
    if store.read_experiment() is None:
        known = ", ".join(list_experiments(root)) or "none"
        raise CliError(f"experiment {experiment}: not found in {root} (experiments there: {known})")
    return store


@main.command()
@experiment_option
@storage_option
@url_option
@queue_option
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True,
              help="How many of the best trials to list.")
@user_errors
def status(experiment: str | None, storage: Path | None, url: str | None, queue: str, top: int) -> None:
    """Trials by stage and state, live progress when Redis answers, and the current leaderboard.

    Works from shared storage alone when Redis is absent or unreachable.
    """
    store = open_experiment(storage, experiment).snapshot()  # leaderboard, flags, quarantine: each file read once
    root, experiment = store.root, store.experiment
    live, workers, note = None, None, None
    url = dispatch.redis_url(url) or running_server_url(store.dir / LOCAL_DIR)
    if url is None:
        note = "no Redis given (--url / $REDIS_URL): showing shared storage only"
    else:
        try:
            dispatcher = dispatch.Dispatcher(dispatch.connect(url), queue, storage=root)
            live, workers = dispatcher.progress(experiment), dispatcher.workers()
        except (dispatch.DispatchError, redis.RedisError) as exc:
            note = f"Redis unreachable, showing shared storage only ({exc})"

    df = build_leaderboard(store, live)
    console.print(f"experiment [bold]{experiment}[/] in {store.dir}")
    if note:
        console.print(f"[yellow]{note}[/]")
    console.print(state_counts(df, store))
    if live is not None:
        console.print(running_table(df, live, workers or []))
    show_watch_findings(store, experiment_config(store))
    console.print(render_table(df, top=top))


def experiment_config(store: ExperimentStore) -> ExperimentConfig:
    """The config an experiment was launched with (the TOML text kept in experiment.json)."""
    try:
        return parse_config(store.read_experiment()["config_text"], f"{store.dir}/experiment.json")
    except (KeyError, TypeError):
        raise CliError(f"experiment {store.experiment}: {store.dir}/experiment.json has no readable config") from None


def show_watch_findings(store: ExperimentStore, config: ExperimentConfig) -> None:
    """Quarantined workers and, per launched stage, the border flags of its trials finished so far."""
    stages = launched_stages(store, config)
    ids = [tid for _, record in stages for tid in record["trial_ids"]]
    for worker, (at, reason) in failing_workers(worker_outcomes(store, ids), config.watch.fail_streak).items():
        when = datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="seconds")
        console.print(f"[red]quarantined worker {worker}: its last {config.watch.fail_streak} jobs failed "
                      f"(last at {when}: {reason})[/]")
    for stage, record in stages:
        live = record.get("status") != "completed"
        messages = flag_messages(border_flags(store, config, stage), stage_space(store, config, stage)) if live \
            else record.get("flag_messages", [])
        for message in messages:
            console.print(f"[yellow]border ({stage}{', so far' if live else ''}): {message}[/]")


# watch, kill --------------------------------------------------------------------------------------
def open_dispatcher(store: ExperimentStore, url: str | None, queue: str) -> tuple[dispatch.Dispatcher, str]:
    """A dispatcher on ``url`` (else $REDIS_URL, else a running launch's embedded Redis) and the masked URL."""
    url = dispatch.redis_url(url) or running_server_url(store.dir / LOCAL_DIR)
    if url is None:
        raise CliError("no Redis to watch: give --url or $REDIS_URL (or run this while `master launch` runs "
                       "its embedded Redis)")
    return dispatch.Dispatcher(dispatch.connect(url), queue, storage=store.root), dispatch.mask_url(url)


@main.command()
@experiment_option
@storage_option
@url_option
@queue_option
@click.option("--forever", is_flag=True,
              help="Keep watching after every launched stage has finished (for stages launched later); "
                   "by default watch returns once they have.")
@user_errors
def watch(experiment: str | None, storage: Path | None, url: str | None, queue: str, forever: bool) -> None:
    """Follow an experiment's trials and act: stop diverged (non-finite loss, or above [watch] explode_factor x
    the initial loss), hopeless (below the stage's ASHA rung cut-off or median) and stalled trials; put the
    trials of dead workers (no heartbeat for [watch] heartbeat_seconds) and of jobs Redis lost back in the
    queue, to resume from their last checkpoints; retry failed trials up to [watch] max_retries; quarantine
    a worker whose last [watch] fail_streak jobs failed (RQ's shutdown command); record each finished stage
    with its border flags. Every action and its reason is printed and kept in the trial's events.jsonl.
    """
    store = open_experiment(storage, experiment)
    config = experiment_config(store)
    dispatcher, shown = open_dispatcher(store, url, queue)
    console.print(f"watching [bold]{store.experiment}[/] on {shown} (queue {queue}) every "
                  f"{config.watch.poll_seconds:g} s; Ctrl-C stops watching, not the trials")
    try:
        watch_loop(Monitor(store, config, dispatcher), until_done=not forever, on_event=lambda e: show_events([e]))
    except KeyboardInterrupt:
        console.print("stopped watching; the trials go on on the workers")
        raise SystemExit(EXIT_INTERRUPTED) from None
    console.print("every launched stage has finished")


@main.command()
@click.argument("trial")
@click.option("--reason", default="stopped by user", show_default=True, help="Why; recorded in the result.")
@experiment_option
@storage_option
@url_option
@queue_option
@user_errors
def kill(trial: str, reason: str, experiment: str | None, storage: Path | None, url: str | None,
         queue: str) -> None:
    """Stop TRIAL by hand: the worker stops it between two batches, keeps its checkpoints and records it
    KILLED with the reason; if it has not stopped after [watch] stop_grace seconds, RQ's stop-job command
    follows. A queued trial stops as soon as a worker takes it."""
    store = open_experiment(storage, experiment)
    config = experiment_config(store)
    raw = store.read_spec(trial) if NAME_RE.match(trial) else None
    if raw is None:
        raise CliError(f"trial {trial}: not in experiment {store.experiment} (see master status)")
    state = (store.read_result(trial) or {}).get("state")
    if state in TERMINAL:
        raise CliError(f"trial {trial}: already finished ({state}); nothing to stop")
    dispatcher, _ = open_dispatcher(store, url, queue)
    move(store, dispatcher, TrialSpec.from_dict(raw), TrialState.KILLED, reason, "stop")
    if dispatcher.jobs(store.experiment, [trial])[trial][0] != "started":
        console.print(f"trial {trial}: stop requested; it is not running, so it stops as soon as a worker takes it")
        return
    result = wait_for_result(store, trial, config.watch.stop_grace)
    if result is None and dispatcher.stop_job(store.experiment, trial):
        console.print(f"trial {trial}: still running after {config.watch.stop_grace:g} s; sent RQ's stop-job command")
        result = wait_for_result(store, trial, config.watch.stop_grace)
    if result is None:
        raise CliError(f"trial {trial}: stop requested but no result yet; see master status")
    kept = len(store.checkpoints(trial))
    console.print(f"trial {trial}: {result['state']} ({result.get('reason')}) after {result.get('epochs_done')} "
                  f"epochs; {kept} checkpoint{'s' if kept != 1 else ''} kept")


def wait_for_result(store: ExperimentStore, trial: str, seconds: float) -> dict[str, Any] | None:
    """The trial's terminal result once it appears within ``seconds``, else None."""
    deadline = time.monotonic() + seconds
    while True:
        result = store.read_result(trial) or {}
        if result.get("state") in TERMINAL:
            return result
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL_SECONDS)


def state_counts(df: Any, store: ExperimentStore) -> Table:
    """Trials per stage (rows) and state (columns), with each stage's recorded status."""
    table = Table(title="trials by state", title_justify="left")
    table.add_column("stage")
    table.add_column("status")
    present = set(df["state"])
    known = [s.value for s in TrialState]
    states = [s for s in known if s in present] + sorted(present - set(known))
    for state in states:
        table.add_column(state, justify="right")
    table.add_column("total", justify="right")
    for stage, group in df.groupby("stage", sort=False):
        counts = group["state"].value_counts()
        status = (store.read_stage(stage) or {}).get("status", "-")
        table.add_row(stage, status, *(str(counts.get(s, 0)) for s in states), str(len(group)))
    return table


def running_table(df: Any, live: dict[str, dict[str, Any]], workers: list[dict[str, Any]]) -> Table:
    """Live progress of the running trials, from Redis."""
    table = Table(title=f"running now ({len(workers)} workers on the queue)", title_justify="left")
    for name in ("trial", "epoch", "val acc", "best", "samples/s", "worker", "updated"):
        table.add_column(name, justify="left" if name in ("trial", "worker") else "right")
    now = time.time()
    for tid in df.loc[df["state"] == "RUNNING", "trial"]:
        p = live.get(tid, {})
        fmt = lambda key, spec: format(p[key], spec) if isinstance(p.get(key), (int, float)) else "-"  # noqa: E731
        table.add_row(tid, f"{p.get('epoch', '-')}/{p.get('epochs', '-')}", fmt("val_acc", ".4f"),
                      fmt("best_val_acc", ".4f"), fmt("samples_per_sec", ".0f"), str(p.get("worker", "-")),
                      f"{now - p['updated']:.0f}s ago" if isinstance(p.get("updated"), (int, float)) else "-")
    return table



# report, ensemble, predict ----------------------------------------------------------------------
@main.command()
@experiment_option
@storage_option
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True,
              help="How many of the best trials to list in the terminal.")
@click.option("--curves", type=click.IntRange(min=1), default=5, show_default=True,
              help="How many of the best trials get learning curves and update ratios on the page.")
@user_errors
def report(experiment: str | None, storage: Path | None, top: int, curves: int) -> None:
    """Write <experiment>/report/: index.html (self-contained: open it from disk), leaderboard.csv and
    leaderboard.json, and list the best trials. Reads shared storage only (no Redis); unreadable files are
    skipped with a warning naming them."""
    from master.report import build_report  # matplotlib: imported only when a report is built (~0.6 s)

    store = open_experiment(storage, experiment).snapshot()
    result = build_report(store, curves=curves)
    console.print(render_table(result.leaderboard, top=top))
    console.print(f"report: {result.html}\nleaderboard: {result.csv}, {result.json.name}")


@main.command()
@experiment_option
@storage_option
@click.option("--top", type=click.IntRange(min=1), required=True, help="How many of the best trials to ensemble.")
@click.option("--method", type=click.Choice(ENSEMBLE_METHODS), default="average", show_default=True,
              help="average: equal weights; greedy: forward selection with replacement on the validation split "
                   "(Caruana et al., 2004) among the top trials.")
@click.option("--ema", is_flag=True, help="Use the running-average (EMA) parameters of each checkpoint.")
@click.option("--snapshots", type=click.IntRange(min=1), default=1, show_default=True,
              help="Checkpoints per member trial: its N best (1: the best only).")
@click.option("--name", default=None, help="Ensemble name (default: top<K>-<method>[-ema][-snap<N>]).")
@user_errors
def ensemble(experiment: str | None, storage: Path | None, top: int, method: str, ema: bool, snapshots: int,
             name: str | None) -> None:
    """Average the softmax outputs of the best trials' best checkpoints; score every member and the ensemble
    on the validation and test splits the trials were trained with; write ensembles/<name>.json."""
    store = open_experiment(storage, experiment)
    record = build_ensemble(store, top, method=method, ema=ema, snapshots=snapshots, name=name)
    console.print(render_ensemble(record))
    console.print(f"ensemble: {store.ensembles_dir / (record['name'] + '.json')}")


@main.command()
@experiment_option
@storage_option
@click.option("--ensemble", "ensemble_name", default=None, metavar="NAME", help="A recorded ensemble to run.")
@click.option("--trial", default=None, metavar="ID", help="A trial to run (its best checkpoint) instead.")
@click.option("--ema", is_flag=True, help="With --trial: use the checkpoint's running-average parameters.")
@click.option("--input", "input_path", type=click.Path(path_type=Path, dir_okay=False), required=True,
              metavar="X.npz", help="Raw samples as array `x` (samples, features...), preprocessed here like the "
                                    "training data; no pickled arrays.")
@click.option("--output", "output_path", type=click.Path(path_type=Path, dir_okay=False), required=True,
              metavar="PREDS.npz", help="Where to write `proba` (samples, classes), `classes` (the dataset's label "
                                      "of each column) and `pred` (predicted labels).")
@user_errors
def predict(experiment: str | None, storage: Path | None, ensemble_name: str | None, trial: str | None, ema: bool,
            input_path: Path, output_path: Path) -> None:
    """Run an ensemble, or one trial's best checkpoint, on new data."""
    store = open_experiment(storage, experiment)
    out = run_prediction(store, input_path, output_path, ensemble=ensemble_name, trial=trial, ema=ema)
    console.print(f"wrote {len(out['pred'])} predictions ({out['proba'].shape[1]} classes) to {output_path}")


if __name__ == "__main__":
    main()
