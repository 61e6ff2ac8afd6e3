"""The ``master`` command line: parse, call master's functions, print. Launch and follow stages, watch and kill
trials, status, report, ensemble, predict."""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Callable

import click
from rich.console import Console
from rich.logging import RichHandler

from master import dispatch
from master.catalog import best_text, experiments_table
from master.console import ConsoleReporter, console
from master.embedded import EmbeddedError
from master.ensemble import METHODS as ENSEMBLE_METHODS, EnsembleError, build_ensemble, render_ensemble
from master.ensemble import predict as run_prediction
from master.experiment import (ExperimentError, experiment_config, job_counts, kill_trial, live_dispatcher,
                               live_progress, open_dispatcher, open_experiment, watch_findings)
from master.budget import parse_budget
from master.launcher import EXIT_INTERRUPTED, LaunchError, launch as run_launch, prepare
from master.leaderboard import build_leaderboard, collapse_runs, render_table, running_table, state_counts
from master.monitor import Monitor, watch as watch_loop
from nncore.errors import ConfigError, DataError
from worker.spec import SpecError
from worker.store import StorageError, storage_root



class CliError(click.ClickException):
    """A problem with the user's input or environment: one line on stderr, exit code 2, nothing written."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class OneLineGroup(click.Group):
    """The ``master`` group: a bad option value or command is one line and exit 2, like every other refusal
    (click would print the usage and a hint around it)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            command = f"{exc.ctx.command_path}: " if exc.ctx is not None and exc.ctx.command is not self else ""
            raise CliError(command + exc.format_message()) from None


USER_ERRORS = (ConfigError, SpecError, DataError, StorageError, dispatch.DispatchError,
               EmbeddedError, EnsembleError, LaunchError, ExperimentError, OSError)  # OSError: storage full, read-only


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


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
@click.option("--budget", default=None, help="With --all: wall time (90s, 20m, 1h) or epochs (2000ep) to fill; "
              "the stages' trial counts are sized from one measured epoch and printed before anything runs.")
@user_errors
def launch(stage: str | None, config_path: Path | None, url: str | None, storage: Path | None, queue: str,
           trials: int | None, seed: int | None, workers: int | None, wait: bool | None, force: bool,
           all_stages: bool, budget: str | None) -> None:
    """Plan a stage's trials, record them in shared storage and enqueue them, one RQ job per trial.

    The first stage samples the search space at random; a narrow stage samples ranges narrowed around the
    previous stage's best trials (printed old -> new, with the previous stage's border flags); a promote stage
    continues the previous stage's best trials from their last checkpoints. A later stage is refused while the
    one before it is unfinished (--force overrides). Launching again after a crash or Ctrl-C resumes the stage:
    nothing is enqueued twice, nothing is lost, interrupted trials continue from their last checkpoints. With
    no Redis URL, runs everything on this machine: an embedded Redis, local workers, a progress bar, then the
    leaderboard. Everything is validated before anything is written.
    """
    if all_stages and (stage is not None or trials is not None or wait is False):
        raise CliError("--all runs every stage with its configured trials to the end; "
                       "drop --stage, --trials and --no-wait")
    if budget is not None and not all_stages:
        raise CliError("--budget sizes every stage of the search: use it with --all")
    sized = parse_budget(budget) if budget is not None else None
    setup = prepare(config_path, storage=storage, url=url, queue=queue, workers=workers, force=force)
    if setup.embedded and wait is False:
        raise CliError("--no-wait needs --url or $REDIS_URL: the embedded Redis lives only while launch runs")
    stages = [s.name for s in setup.config.stages] if all_stages else [stage] if stage else None
    follow = all_stages or setup.embedded or bool(wait)
    raise SystemExit(run_launch(setup, stages, seed=seed, trials=trials, wait=follow, reporter=ConsoleReporter(),
                               budget=sized))


# status -------------------------------------------------------------------------------------
@main.command()
@experiment_option
@storage_option
@url_option
@queue_option
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True,
              help="How many of the best trials to list.")
@user_errors
def status(experiment: str | None, storage: Path | None, url: str | None, queue: str, top: int) -> None:
    """Trials by stage and state, live progress when Redis answers, and the current leaderboard (one row per run).
    Works from shared storage alone when Redis is absent or unreachable."""
    store = open_experiment(storage, experiment).snapshot()  # leaderboard, flags, quarantine: each file read once
    dispatcher, note = live_dispatcher(store, url, queue)
    live, workers, failed = live_progress(dispatcher, store.experiment)
    note, jobs = note or failed, job_counts(dispatcher, store.experiment)
    df = build_leaderboard(store, live)
    console.print(f"experiment [bold]{store.experiment}[/] in {store.dir}")
    if note:
        console.print(f"[yellow]{note}[/]")
    console.print(state_counts(df, store))
    if live is not None:
        console.print(running_table(df, live, workers or []))
        console.print(f"RQ jobs on queue {queue}: " + ", ".join(f"{n} {status}" for status, n in jobs.items()))
    for kind, message in watch_findings(store, experiment_config(store)):
        console.print(f"[{'red' if kind == 'quarantine' else 'yellow'}]{message}[/]")
    console.print(render_table(collapse_runs(store, df), top=top, width=console.width))


@main.command("list")
@storage_option
@user_errors
def list_experiments(storage: Path | None) -> None:
    """The experiments under the storage root, newest first: each stage's status, trials and the best run."""
    console.print(experiments_table(storage_root(storage)))


@main.command()
@experiment_option
@storage_option
@click.option("--toml", "as_toml", is_flag=True, help="Print an experiment TOML that runs the best config again.")
@user_errors
def best(experiment: str | None, storage: Path | None, as_toml: bool) -> None:
    """The best run's full config (its trial spec: dataset, data, model, solver, seed), or a TOML to relaunch."""
    click.echo(best_text(open_experiment(storage, experiment), as_toml))


# watch, kill --------------------------------------------------------------------------------------
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
        watch_loop(Monitor(store, config, dispatcher), until_done=not forever,
                   on_event=lambda e: ConsoleReporter().events([e]))
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
    killed = kill_trial(open_experiment(storage, experiment), trial, reason, url, queue)
    if killed.result is None:
        console.print(f"trial {trial}: stop requested; it is not running, so it stops as soon as a worker takes it")
        return
    if killed.forced:
        console.print(f"trial {trial}: still running after the grace period; sent RQ's stop-job command")
    result, kept = killed.result, len(open_experiment(storage, experiment).checkpoints(trial))
    console.print(f"trial {trial}: {result.state.value} ({result.reason}) after {result.epochs_done} "
                  f"epochs; {kept} checkpoint{'s' if kept != 1 else ''} kept")


# report, ensemble, predict ----------------------------------------------------------------------
@main.command()
@experiment_option
@storage_option
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True,
              help="How many of the best trials to list in the terminal.")
@click.option("--curves", type=click.IntRange(min=1), default=5, show_default=True,
              help="How many of the best trials get learning curves and update ratios on the page.")
@click.option("--trial", default=None, metavar="ID", help="Only write report/trial-<ID>.html: that trial's "
                                                          "babysitting pictures and diagnosis.")
@user_errors
def report(experiment: str | None, storage: Path | None, top: int, curves: int, trial: str | None) -> None:
    """Write <experiment>/report/: index.html (self-contained: open it from disk), leaderboard.csv and
    leaderboard.json, and list the best trials. Reads shared storage only (no Redis); unreadable files are
    skipped with a warning naming them."""
    from master.babysit import build_trial_report  # matplotlib: imported only when a report is built (~0.6 s)
    from master.report import build_report

    store = open_experiment(storage, experiment).snapshot()
    if trial is not None:
        console.print(f"report: {build_trial_report(store, trial)}")
        return
    result = build_report(store, curves=curves)
    console.print(render_table(collapse_runs(store, result.leaderboard), top=top, width=console.width))
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
    console.print(f"ensemble: {store.ensemble_path(record['name'])}")


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


@main.command()
@click.option("--experiment", default=None, metavar="NAME",
              help="Show this experiment only (default: every experiment under the storage root).")
@storage_option
@url_option
@queue_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (this machine only).")
@click.option("--port", type=click.IntRange(0, 65535), default=8265, show_default=True, help="Port (0: any free).")
@click.option("--allow-actions", is_flag=True, help="Allow kill and launch from the page, with a token printed here.")
@user_errors
def serve(experiment: str | None, storage: Path | None, url: str | None, queue: str, host: str, port: int,
          allow_actions: bool) -> None:
    """A live dashboard of one experiment (--experiment) or of every one in storage, refreshing on its own; Redis
    when it answers, storage alone otherwise; read-only unless --allow-actions. Pages: add ?refresh=SECONDS."""
    from master.dashboard import serve as run_dashboard  # Flask is imported only when a dashboard is served
    say = functools.partial(console.print, soft_wrap=True)  # an address or token is never cut in two
    run_dashboard(storage, experiment, url, queue, host, port, allow_actions, say=say)

if __name__ == "__main__":
    main()
