"""Launch stages: validate, plan, record and enqueue, then follow them (on a cluster's Redis, or on this machine
with an embedded Redis and local workers) through the shared watch loop; what it tells the user goes to a Reporter.

The CLI's ``master launch`` and the Python API call ``launch``; nothing here prints or parses arguments.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, replace
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd

from master import dispatch
from master.budget import (Budget, BudgetError, Costs, fit_costs, measure, plan_entry, plan_lines as budget_lines,
                           planned_config, resize, size_plan, stage_cost, start_epoch)
from master.config import DEFAULT_CONFIG, ConfigError, ExperimentConfig, load_config, parse_config
from master.embedded import EmbeddedRedis, LocalWorkers, redis_server_binary
from master.leaderboard import build_leaderboard
from master.monitor import Event, Monitor, close_stage, enqueue, request_stop, watch
from master.sampler import left_out
from master.stages import StagePlan, plan_stage, previous_stage, stage_completed, stage_status, stage_trials
from nncore.data import load_dataset
from worker.records import ExperimentRecord, StageRecord, TrialResult
from worker.spec import SpecError, TrialSpec
from worker.states import StageStatus, TrialState
from worker.store import ExperimentStore, now_iso, probe_writable, storage_root
from worker.trainer import HANDED_BACK

log = logging.getLogger(__name__)

NO_WORKER_HINT_SECONDS = 5.0  # a followed remote stage no worker has touched by then gets a how-to-start hint
POLL_SECONDS = 0.3  # how often a followed stage's progress is looked at (the watch loop acts less often)
INTERRUPTED_REASON = "interrupted by user (Ctrl-C)"
BORDER = "border: "  # a plan line telling the previous stage's border flag
BUDGET_REASON = "the budget's wall time is spent"
LAST_STAGE_MARGIN = 1.25  # a wall-time budget's last stage is sized this much larger; its deadline cuts it
EXIT_INTERRUPTED = 130


class LaunchError(ValueError):
    """A launch refused before anything is written: the message names the stage, trial, option or path."""


class Reporter:
    """What a launch tells its user. This base logs; the CLI's subclass prints with rich and draws progress.
    A border flag is told once per launch: when its stage closes, not again in the next stage's plan."""

    def __init__(self) -> None:
        self.flags_told: set[str] = set()

    def message(self, text: str) -> None:
        log.info("%s", text)

    def warning(self, text: str) -> None:
        log.warning("%s", text)

    def line(self, text: str, kind: str) -> None:
        """One line of a plan or of the watch loop's events; ``kind`` is "flag", "plan" or an Event kind."""
        self.message(text)

    def plan(self, plan: StagePlan) -> None:
        """The previous stage's border flags (unless told already), where the trials come from, and each range."""
        for line in plan_lines(plan):
            flag = line.startswith(BORDER)
            if not (flag and line[len(BORDER):] in self.flags_told):
                self.line(line, "flag" if flag else "plan")

    def events(self, events: list[Event]) -> None:
        """What the watch loop did (stops, requeues, retries, border flags), one line each."""
        for event in events:
            if event.kind == "flag":
                self.flags_told.add(event.message)
            self.line(event.message, event.kind)

    def leaderboard(self, df: pd.DataFrame, title: str) -> None:
        """The leaderboard of a stage that ended."""

    @contextlib.contextmanager
    def following(self, label: str, total: int) -> Iterator[Callable[[int, int, str], None]]:
        """Around following a stage: yields ``update(finished, running, best_line)``, which tells a line per change."""
        last: list[tuple[int, int, str]] = []

        def update(finished: int, running: int, best: str) -> None:
            if last[-1:] != [(finished, running, best)]:
                last.append((finished, running, best))
                self.message(f"{label}: {finished}/{total} finished, {running} running; {best}")
        yield update


def plan_lines(plan: StagePlan) -> list[str]:
    """The lines that describe a stage's plan (border flags first)."""
    from master.borders import range_text

    dists = {old.name: old for old, _ in plan.ranges}
    lines = [f"{BORDER}{flag.message(dists[flag.name])}" for flag in plan.flags]
    if plan.note:
        lines.append(plan.note)
    for old, new in plan.ranges:
        change = f"-> {range_text(new)}" if new != old else "(kept: the evidence is weak)"
        lines.append(f"  {old.name}: {range_text(old)} {change}")
    return lines + skipped_lines(plan)


def skipped_lines(plan: StagePlan) -> list[str]:
    """One line per parameter some trials did not sample because it does not apply to them."""
    total = len(plan.specs)
    return [f"  {name}: not sampled for {n} of {total} trials, where it does not apply (its `when`, or the trial's "
            f"update, schedule, arch, activation or init does not read it)"
            for name, n in left_out(plan.space, plan.specs).items()]


@dataclass(frozen=True)
class Launch:
    """Where and how to launch: the experiment's config and the TOML it came from, storage, Redis, queue."""

    config: ExperimentConfig
    config_text: str
    store: ExperimentStore
    url: str | None  # None: an embedded Redis and local workers on this machine
    queue: str = dispatch.DEFAULT_QUEUE
    workers: int | None = None  # local workers (embedded only); default one per core, at most one per trial
    force: bool = False
    deadline: float | None = None  # time.monotonic() at which a wall-time budget's last stage stops its trials

    @property
    def embedded(self) -> bool:
        return self.url is None


def prepare(config_path: str | os.PathLike[str] | None = None, *, storage: str | os.PathLike[str] | None = None,
            url: str | None = None, queue: str = dispatch.DEFAULT_QUEUE, workers: int | None = None,
            force: bool = False) -> Launch:
    """Load and validate the config, resolve storage and Redis (``url``, else $REDIS_URL, else embedded) and
    check that the storage root is usable; nothing is written. LaunchError / ConfigError otherwise."""
    url = dispatch.redis_url(url)
    if url is not None and workers is not None:
        raise LaunchError("--workers starts local workers for the embedded Redis only; with --url, run "
                          "`worker start --url ...` on the worker machines")
    root = storage_root(storage)
    config = load_config(config_path)
    store = ExperimentStore(root, config.name)
    check_storage(root, store, must_exist=storage is not None or "HYPERSEARCH_STORAGE" in os.environ)
    config = planned_config(config, store.read_experiment())  # a launch sized from a budget resumes its plan
    return Launch(config, config_text(config_path), store, url, queue, workers, force)


def launch(setup: Launch, stages: list[str] | None = None, *, seed: int | None = None, trials: int | None = None,
           wait: bool = True, reporter: Reporter | None = None, budget: Budget | None = None) -> int:
    """Launch ``stages`` (default: the config's first; every stage already completed is skipped when more than
    one is given) in order, each followed to its end before the next is planned when ``wait``; with ``budget``,
    every stage, sized to fill it (and re-sized after each stage). Returns the exit code: 0 when every stage
    launched (and, followed, completed), 1 when one ended incomplete, 130 on Ctrl-C."""
    reporter = reporter or Reporter()
    config, store = setup.config, setup.store
    names = stages or [config.stages[0].name]
    for name in names:
        config.stage(name)  # an unknown stage is refused before anything runs
    dispatcher = None if setup.embedded else dispatch.Dispatcher(dispatch.connect(setup.url), setup.queue)
    clock = None
    if budget is not None:
        setup, clock = size_launch(setup, budget, dispatcher, reporter)
        names = [s.name for s in setup.config.stages]
    for i, name in enumerate(names):
        if len(names) > 1 and stage_completed(store, name, config.watch.max_retries):
            reporter.message(f"stage {name} already completed")
            continue
        if clock is not None:
            setup = clock.revise(setup, i, reporter) if i else setup
            clock.marks.append(time.monotonic())
            if budget.seconds and i == len(names) - 1:
                setup = replace(setup, deadline=clock.started + budget.amount)
        code = launch_stage(setup, name, seed, trials, dispatcher, wait, reporter)
        if code:
            return code
    return 0


@dataclass(frozen=True)
class BudgetClock:
    """A launch sized from a budget: the budget, the cost model measured before it, when it started, and when
    each stage started (appended by ``launch``)."""

    budget: Budget
    costs: Costs
    started: float
    marks: list[float]

    def revise(self, setup: Launch, done: int, reporter: Reporter) -> Launch:
        """Re-size the stages after the first ``done`` to what is left of the budget (wall time: with the cost
        model refitted to the trials and stages run so far), record and show it."""
        stages, store = setup.config.stages, setup.store
        results = [[(r, start_epoch(stages, i)) for tid in stage_trials(store, stage.name)
                    if (r := store.read_result(tid)) is not None] for i, stage in enumerate(stages[:done])]
        available = sum(1 for r, _ in results[-1] if r.state is TrialState.COMPLETED)
        costs = None
        if self.budget.seconds:
            now = time.monotonic()
            walls = [b - a for a, b in zip(self.marks, self.marks[1:] + [now])]
            costs = fit_costs(self.costs, [(r.epochs_done - s, r.seconds) for rs in results for r, s in rs],
                              [(w, sum(r.seconds for r, _ in rs)) for w, rs in zip(walls, results)])
            left = self.budget.amount - (now - self.started)
        else:
            left = self.budget.amount - sum(max(0, r.epochs_done - s) for rs in results for r, s in rs)
        last = self.budget.seconds and done == len(stages) - 1  # cut at the deadline: sized to use all of it
        sized = resize(stages, done, left * (LAST_STAGE_MARGIN if last else 1.0), costs, available)
        most = sum(stage_cost(sized, i, costs) for i in range(done, len(sized)))
        record = store.read_experiment()
        store.write_experiment(replace(record, plans=record.plans + (plan_entry(sized, stages[done - 1].name, left,
                                                                                   most),)))
        reporter.message(f"budget: {self.budget.describe(max(0.0, left))} left; the stages still to run"
                         + (" (the last sized to overrun; its trials stop when the time is spent):" if last else ":"))
        for line in budget_lines(sized, self.budget, costs, done):
            reporter.message(line)
        return replace(setup, config=replace(setup.config, stages=sized))


def size_launch(setup: Launch, budget: Budget, dispatcher: dispatch.Dispatcher | None,
                reporter: Reporter) -> tuple[Launch, BudgetClock | None]:
    """Measure one epoch of the first trial here, size the config's stages to fill ``budget``, show the plan and
    record it with the budget in experiment.json. A launch sized before resumes its recorded plan (no clock)."""
    started = time.monotonic()
    store, config = setup.store, setup.config
    record = store.read_experiment()
    if record is not None and record.plans:
        reporter.message(f"budget: resuming the plan recorded in {store.dir}/experiment.json")
        return setup, None
    if record is not None:
        raise LaunchError(f"experiment {config.name}: launched before without --budget; a budget sizes a new "
                          f"experiment (rename it, or use another --storage)")
    workers = setup.workers or available_cores() if dispatcher is None else max(1, len(dispatcher.workers()))
    costs = replace(measure(config), workers=workers)
    try:
        sized = size_plan(config.stages, budget.amount, costs if budget.seconds else None)
    except BudgetError as exc:
        raise BudgetError(f"--budget {budget.text}: {exc}") from None
    sized_config = replace(config, stages=sized)
    most = sum(stage_cost(sized, i, costs if budget.seconds else None) for i in range(len(sized)))
    reporter.message(f"budget {budget.text}: {config.stages[0].name}'s first trial measured here: {costs.epoch:.3f} s "
                     f"an epoch, {costs.trial:.3f} s a trial besides; {workers} workers; the plan:")
    for line in budget_lines(sized, budget, costs):
        reporter.message(line)
    store.ensure()
    store.write_experiment(ExperimentRecord(
        config.name, sized_config.to_dict(), setup.config_text, config.seed, now_iso(), code_version(),
        budget={"text": budget.text, "amount": budget.amount, "unit": budget.unit, "workers": workers,
                "epoch_seconds": round(costs.epoch, 6), "trial_seconds": round(costs.trial, 6)},
        plans=(plan_entry(sized, None, budget.amount, most),), id=new_experiment_id()))
    return replace(setup, config=sized_config), BudgetClock(budget, costs, started, [])


def check_storage(root: Path, store: ExperimentStore, must_exist: bool) -> None:
    """Refuse a storage root that is missing (when named explicitly), not a directory or not writable,
    without leaving anything in it; the default ``./checkpoints`` is created later if missing."""
    if root.exists() and not root.is_dir():
        raise LaunchError(f"storage {root}: not a directory")
    if not root.exists() and must_exist:
        raise LaunchError(f"storage {root}: does not exist (create it, or point --storage at shared storage)")
    probe_writable(next(p for p in (store.dir, root, root.absolute().parent) if p.is_dir()), root)


def check_previous(store: ExperimentStore, config: ExperimentConfig, name: str) -> None:
    """Refuse a later stage while the stage before it has not been launched or has unfinished trials."""
    before = previous_stage(config, name)
    if before is None or stage_trials(store, name):  # the first stage, or a resumed one
        return
    ids = stage_trials(store, before.name)
    if not ids:
        raise LaunchError(f"stage {name}: stage {before.name} before it has not been launched "
                          f"(master launch --stage {before.name}, or --all)")
    status = stage_status(store, ids, config.watch.max_retries)
    if not status.finished:
        raise LaunchError(f"stage {name}: stage {before.name} before it is unfinished ({status.describe()}); "
                          f"wait for it (master watch) or use --force to plan from its finished trials")


def launch_stage(setup: Launch, name: str, seed: int | None, trials: int | None,
                 dispatcher: dispatch.Dispatcher | None, wait: bool, reporter: Reporter) -> int:
    """Plan, record and run one stage (embedded when ``dispatcher`` is None); returns the exit code."""
    config, store = setup.config, setup.store
    if not setup.force:
        check_previous(store, config, name)
    plan = plan_stage(store, config, name, seed, trials)
    if not plan.specs:
        raise LaunchError(f"stage {plan.stage.name}: nothing to launch ({plan.note})")
    check_existing(store, config, plan.specs)
    if dispatcher is None:  # local workers will read the same files: make sure the dataset loads before writing
        load_dataset(config.dataset, **plan.specs[0].data)
        binary = redis_server_binary()
    record_launch(store, config, setup.config_text, plan, config.seed if seed is None else seed)
    reporter.plan(plan)
    specs = list(plan.specs)
    if dispatcher is None:
        workers = min(setup.workers or available_cores(), len(specs))
        return run_embedded(store, config, specs, binary, setup.queue, workers, setup.force, reporter, setup.deadline)
    return run_remote(store, config, specs, dispatcher, dispatch.mask_url(setup.url), setup.force, wait, reporter,
                      setup.deadline)


def run_remote(store: ExperimentStore, config: ExperimentConfig, specs: list[TrialSpec],
               dispatcher: dispatch.Dispatcher, shown_url: str, force: bool, wait: bool, reporter: Reporter,
               deadline: float | None = None) -> int:
    """Enqueue on a Redis the workers share; then return, or follow the stage when ``wait``. Exit code."""
    enqueued = enqueue(store, dispatcher, specs, force=force)
    skipped = len(specs) - len(enqueued)
    queue, stage = dispatcher.queue.name, specs[0].stage
    reporter.message(f"enqueued {len(enqueued)} of {len(specs)} trials of stage {stage} of {store.experiment} on "
                     f"{shown_url} (queue {queue})" + (f"; {skipped} already queued or finished" if skipped else ""))
    where = f"--url {shown_url} --storage {store.root} --queue {queue}"
    worker_line = f"worker start {where}"
    if not wait:
        options = f"--experiment {store.experiment} {where}"
        reporter.message(f"workers: {worker_line}\nstatus:  master status {options}\n"
                         f"watch:   master watch {options} (stops bad trials, requeues those of lost workers)")
        return 0
    try:
        outcome = follow(store, config, dispatcher, specs, reporter, hint=worker_line, deadline=deadline)
    except KeyboardInterrupt:
        reporter.message("stopped following; the trials go on on the workers")
        return EXIT_INTERRUPTED
    finish_stage(store, stage, outcome, specs, reporter)
    return 0 if outcome is StageStatus.COMPLETED else 1


def available_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_existing(store: ExperimentStore, config: ExperimentConfig, specs: list[TrialSpec]) -> None:
    """Refuse to mix two different experiments (or two samplings of one stage) under the same name."""
    previous = store.read_experiment()
    if previous is not None and not same_config(previous, config):
        raise LaunchError(f"experiment {config.name}: {store.dir} holds a different config; rename the experiment "
                          f"(experiment.name) or use another --storage")
    for spec in specs:
        existing = store.read_spec(spec.trial_id)
        if existing is not None and not same_spec(existing, spec):
            raise LaunchError(f"trial {spec.trial_id}: already in {store.dir} with different settings "
                              f"(another --seed?); use the original seed or another experiment name")


def same_config(snapshot: ExperimentRecord, config: ExperimentConfig) -> bool:
    """Whether a stored config snapshot describes ``config``, judged by parsing its TOML text with today's
    code (so config fields added since, with their defaults, do not count as a change), its stages those of
    its last recorded plan where a budget sized them."""
    try:
        return planned_config(parse_config(snapshot.config_text), snapshot) == config
    except ConfigError:
        return False


def same_spec(stored: Any, spec: TrialSpec) -> bool:
    """Whether a stored spec.json is ``spec`` (validated with today's defaults, like the config above)."""
    try:
        return TrialSpec.from_dict(stored) == spec
    except SpecError:
        return False


def config_text(path: str | os.PathLike[str] | None) -> str:
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


def new_experiment_id() -> str:
    """A new experiment's random id (experiment.json; its jobs carry it so a worker can tell another storage's)."""
    return os.urandom(8).hex()


def record_launch(store: ExperimentStore, config: ExperimentConfig, text: str, plan: StagePlan, seed: int) -> None:
    """Write experiment.json (once), stages/<stage>.json (ranges sampled, trial ids) and each trial's spec.json."""
    store.ensure()
    if store.read_experiment() is None:
        store.write_experiment(ExperimentRecord(config.name, config.to_dict(), text, config.seed, now_iso(),
                                                code_version(), id=new_experiment_id()))
    stage = plan.stage.name
    previous = store.read_stage(stage)
    ids = sorted(set(previous.trial_ids if previous else ()) | {s.trial_id for s in plan.specs})
    store.write_stage(StageRecord(
        stage=stage, method=plan.stage.method, epochs=plan.stage.epochs, seed=seed, trial_ids=tuple(ids),
        status=StageStatus.LAUNCHED, ranges={d.name: d.to_dict() for d in plan.space}, from_stage=plan.previous,
        note=plan.note, created_at=previous.created_at if previous else now_iso(), updated_at=now_iso()))
    for spec in plan.specs:
        if store.read_spec(spec.trial_id) is None:
            store.write_spec(spec.to_dict())


def unfinished(store: ExperimentStore, specs: list[TrialSpec]) -> list[str]:
    """Ids of the trials of ``specs`` without an outcome."""
    return [s.trial_id for s in specs if not ((r := store.read_result(s.trial_id)) and r.terminal)]


def finish_stage(store: ExperimentStore, stage: str, outcome: StageStatus, specs: list[TrialSpec],
                 reporter: Reporter) -> None:
    """Record how following the stage ended, then show the leaderboard of the stage."""
    store.set_stage_status(stage, outcome)
    df = build_leaderboard(store, stage=stage)
    reporter.leaderboard(df, f"{store.experiment} / {stage}: top {min(10, len(df))} of {len(df)} trials "
                             f"(by validation accuracy)")
    left = unfinished(store, specs)
    if outcome is StageStatus.COMPLETED:
        reporter.message(f"stage {stage} completed; results in {store.dir}")
    else:
        reporter.message(f"stage {stage} {outcome.value}: {len(left)} of {len(specs)} trials unfinished "
                         f"({', '.join(left[:5])}{', ...' if len(left) > 5 else ''}); results in {store.dir}")


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
                 queue: str, workers: int, force: bool, reporter: Reporter, deadline: float | None = None) -> int:
    """Run the stage on this machine: embedded Redis (``binary``), enqueue, ``workers`` local workers, follow,
    stop everything started here (also on Ctrl-C), show the leaderboard. Returns the exit code."""
    stage = specs[0].stage
    server = EmbeddedRedis(store.local_dir, binary=binary)
    pool: LocalWorkers | None = None
    outcome = StageStatus.INTERRUPTED
    with sigterm_as_interrupt():
        try:
            url = server.start()
            dispatcher = dispatch.Dispatcher(dispatch.connect(url), queue)
            enqueued = enqueue(store, dispatcher, specs, force=force)
            if enqueued:
                pool = LocalWorkers(store.local_dir, url, store.root, queue=queue, count=min(workers, len(enqueued)))
                n = len(enqueued)
                reporter.message(f"running {n} trial{'s' if n != 1 else ''} of stage {stage} of {store.experiment} "
                                 f"on {pool.count} local worker{'s' if pool.count != 1 else ''} (embedded Redis, "
                                 f"storage {store.root})")
                pool.start()
                outcome = follow(store, config, dispatcher, specs, reporter, pool, deadline=deadline)
            else:
                reporter.message(f"nothing to run: all {len(specs)} trials of stage {stage} already finished "
                                 "(--force runs them again)")
                outcome = StageStatus.COMPLETED
        except KeyboardInterrupt:
            reporter.warning("interrupted: stopping the running trials, the workers and Redis")
            if pool is not None:
                stop_trials(store, dispatcher, specs)
        finally:
            if pool is not None:
                pool.stop()
            server.stop()
    if outcome is StageStatus.INTERRUPTED:
        requeue_interrupted(store, specs)
    finish_stage(store, stage, outcome, specs, reporter)
    if outcome is StageStatus.INTERRUPTED:
        reporter.message("the same command resumes the interrupted trials from their checkpoints")
        return EXIT_INTERRUPTED
    if pool is not None and pool.failed():
        log.warning("local workers exited with codes %s; their logs are in %s", pool.failed(), store.local_dir)
    return 0 if outcome is StageStatus.COMPLETED else 1


def stop_trials(store: ExperimentStore, dispatcher: dispatch.Dispatcher, specs: list[TrialSpec],
                reason: str = INTERRUPTED_REASON) -> None:
    """Ask every unfinished trial of ``specs`` to stop (honoured within about a second), with the reason."""
    left = set(unfinished(store, specs))
    for spec in specs:
        if spec.trial_id not in left:
            continue
        try:
            request_stop(store, dispatcher, spec, TrialState.KILLED, reason)
        except dispatch.RedisError as exc:
            log.warning("cannot request a stop of %s: %s", spec.trial_id, exc)
            return


def requeue_interrupted(store: ExperimentStore, specs: list[TrialSpec]) -> None:
    """Trials that stopped because the user interrupted the launch are unfinished, not killed: they go back to
    QUEUED (the reason kept), so launching again resumes them from their checkpoints. A local worker that got
    the Ctrl-C itself handed its trial back QUEUED ("shutting down"): recorded as interrupted too."""
    for spec in specs:
        result = store.read_result(spec.trial_id)
        if result is None:
            continue
        killed = result.state is TrialState.KILLED and result.reason == INTERRUPTED_REASON
        handed_back = result.state is TrialState.QUEUED and \
            (store.read_events(spec.trial_id) or [{}])[-1].get("event") == HANDED_BACK
        if killed or handed_back:
            store.transition(spec.trial_id, TrialState.QUEUED, INTERRUPTED_REASON, "interrupted")


def follow(store: ExperimentStore, config: ExperimentConfig, dispatcher: dispatch.Dispatcher,
           specs: list[TrialSpec], reporter: Reporter, pool: LocalWorkers | None = None,
           hint: str = "", deadline: float | None = None) -> StageStatus:
    """Follow a stage through the watch loop (master.monitor: stop bad trials, requeue lost ones, retry failed
    ones, every ``[watch] poll_seconds``), showing progress and the best trial so far, until every trial has
    finished (COMPLETED; failed ones out of retries) or every local worker has exited (INCOMPLETE). When no
    trial has started NO_WORKER_HINT_SECONDS after following began, ``hint`` (how to start a worker) is told once.
    At ``deadline`` (time.monotonic()), every trial still queued or running is asked to stop (a budget spent)."""
    ids = [s.trial_id for s in specs]
    started = time.monotonic()
    stage = specs[0].stage
    final: dict[str, TrialResult] = {}  # outcomes no retry replaces, read once (a large stage has many)
    outcome: list[StageStatus] = []
    spent: list[bool] = []

    def look(update: Callable[[int, int, str], None]) -> bool:
        nonlocal hint
        # asked before reading results, so a worker that finished the last trial and quit counts as done
        stranded = pool is not None and pool.alive() == 0
        if deadline is not None and not spent and time.monotonic() >= deadline:
            spent.append(True)
            reporter.message(f"{BUDGET_REASON}: stopping the trials of stage {stage} still queued or running")
            stop_trials(store, dispatcher, specs, BUDGET_REASON)
        try:
            live = dispatcher.progress(store.experiment)
        except dispatch.RedisError as exc:
            log.warning("cannot reach Redis this time: %s", exc)
            live = {}
        done = dict(final)
        for tid in ids:
            if tid not in final and (result := store.read_result(tid)) is not None and result.terminal:
                done[tid] = result
                if result.state is not TrialState.FAILED:
                    final[tid] = result
        running = sum(1 for tid in ids if tid not in done and live.get(tid, {}).get("state") == TrialState.RUNNING)
        update(len(done), running, best_line(done, live, ids))
        if len(done) == len(ids) and (status := stage_status(store, ids, config.watch.max_retries)).finished:
            record = store.read_stage(stage)
            if record is None or not record.closed:  # the watch loop may have closed it (and told its flags)
                reporter.events(close_stage(store, config, stage, status.describe()))
            outcome.append(StageStatus.COMPLETED)
        elif hint and not done and not running and time.monotonic() - started > NO_WORKER_HINT_SECONDS:
            reporter.warning(f"no worker has taken a trial after {NO_WORKER_HINT_SECONDS:g} s; start one with: {hint}")
            hint = ""
        elif stranded:
            outcome.append(StageStatus.INCOMPLETE)
        return bool(outcome)

    with reporter.following(f"{store.experiment}/{stage}", len(ids)) as update:
        watch(Monitor(store, config, dispatcher), until_done=False, on_event=lambda e: reporter.events([e]),
              look=lambda: look(update), look_seconds=POLL_SECONDS)
    return outcome[0]


def best_line(done: dict[str, TrialResult], live: dict[str, dict[str, Any]], ids: list[str]) -> str:
    """"best so far: <trial> val 0.9612 (epoch 1, COMPLETED)" over finished results and live progress."""
    candidates = []
    for tid in ids:  # in id order, so the first of equally good trials wins
        if tid in done:
            r = done[tid]
            candidates.append((r.best_val_acc, tid, r.best_epoch, r.state.value))
        elif isinstance(live.get(tid, {}).get("best_val_acc"), (int, float)):
            p = live[tid]
            candidates.append((float(p["best_val_acc"]), tid, p.get("epoch"), p.get("state", TrialState.RUNNING.value)))
    if not candidates:
        return "best so far: -"
    acc, tid, epoch, state = max(candidates, key=lambda c: c[0])
    return f"best so far: {tid} val {acc:.4f} (epoch {epoch}, {state})"

