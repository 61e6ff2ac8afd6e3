"""The leaderboard: one row per trial built from shared storage alone, and its rich table."""
from __future__ import annotations

import json
import math
import time
from typing import Any

import pandas as pd
from rich import box
from rich.table import Table
from rich.text import Text

from master.experiment import stage_order
from master.lineage import chains, label
from worker.states import TrialState
from worker.store import ExperimentStore

BASE_COLUMNS = ["trial", "stage", "state", "reason", "val_acc", "best_epoch", "train_acc", "epochs",
                "seconds", "worker"]
RUN_COLUMNS = ["stages", "lineage"]  # what collapse_runs adds after "stage": the run's stages and trials
WIDE = 100  # terminal columns the leaderboard needs for its worker column besides the hyperparameters
UNREADABLE = "UNREADABLE"  # the state shown for a trial whose result.json is corrupt: unknown, not RUNNING
STATE_STYLES = {TrialState.COMPLETED.value: "green", TrialState.KILLED.value: "yellow",
                TrialState.DIVERGED.value: "red", TrialState.FAILED.value: "red",
                TrialState.RUNNING.value: "cyan", TrialState.QUEUED.value: "dim", UNREADABLE: "magenta"}


def _number(value: Any) -> float:
    """``value`` as a float (Redis hands back strings), NaN when missing or unparsable."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _best_of(history: list[dict[str, Any]]) -> tuple[float, int | None]:
    """(best validation accuracy, its epoch) over the history records; the earliest epoch wins ties."""
    scored = [r for r in history if math.isfinite(_number(r.get("val_acc")))]
    if not scored:
        return math.nan, None
    best = max(scored, key=lambda r: (_number(r["val_acc"]), -r["epoch"]))
    return _number(best["val_acc"]), best["epoch"]


def _seconds(history: list[dict[str, Any]], recorded: float) -> float:
    """Training seconds summed over the history's epochs (every resume, and a promoted run's parent epochs),
    else the recorded seconds of the last segment."""
    per_epoch = [_number(r.get("seconds")) for r in history]
    per_epoch = [v for v in per_epoch if math.isfinite(v)]
    return float(sum(per_epoch)) if per_epoch else recorded


def trial_row(store: ExperimentStore, trial_id: str, spec: dict[str, Any],
              live: dict[str, Any] | None = None) -> dict[str, Any]:
    """One leaderboard row; ``live`` is the trial's Redis progress hash, if known, for unfinished trials."""
    result = store.read_result(trial_id)
    history = store.read_history(trial_id)
    live = live or {}
    if result is not None and result.terminal:
        state, reason = result.state.value, result.reason
        val_acc, best_epoch = result.best_val_acc, result.best_epoch
        epochs, seconds, worker = result.epochs_done, _seconds(history, result.seconds), result.worker
    else:  # queued or running: the epochs recorded so far (Redis's live state is fresher than the record; with no
        # result.json, a trial with epochs on disk has run; with a corrupt one, its state is unknown)
        unreadable = result is None and store.result_unreadable(trial_id)
        recorded = (result.state.value if result is not None else UNREADABLE if unreadable
                    else (TrialState.RUNNING if history else TrialState.QUEUED).value)
        state = live.get("state") or recorded
        reason = live.get("reason") or ("result.json unreadable" if unreadable else "")
        val_acc, best_epoch = _best_of(history)
        epochs = max((r["epoch"] for r in history), default=0)
        seconds = _seconds(history, 0.0)
        worker = live.get("worker") or (result.worker if result is not None else "")
    at_best = next((r for r in history if r["epoch"] == best_epoch), {})
    return {"trial": trial_id, "stage": spec.get("stage", ""), "state": str(state), "reason": reason,
            "val_acc": val_acc, "best_epoch": best_epoch, "train_acc": _number(at_best.get("train_acc")),
            "epochs": epochs, "seconds": seconds, "worker": worker, **(spec.get("params") or {})}


def build_leaderboard(store: ExperimentStore, progress: dict[str, dict[str, Any]] | None = None,
                      stage: str | None = None) -> pd.DataFrame:
    """Every trial of the experiment (of ``stage`` if given), best validation accuracy first."""
    progress = progress or {}
    rows = [trial_row(store, tid, spec, progress.get(tid)) for tid, spec in store.iter_trials()
            if stage is None or spec.get("stage") == stage]
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=BASE_COLUMNS)
    params = sorted(c for c in df.columns if c not in BASE_COLUMNS)
    df = df[BASE_COLUMNS + params]
    df["best_epoch"] = df["best_epoch"].astype("Int64")
    df["epochs"] = df["epochs"].astype("Int64")
    return df.sort_values(["val_acc", "trial"], ascending=[False, True], na_position="last",
                          kind="stable").reset_index(drop=True)


def param_columns(df: pd.DataFrame) -> list[str]:
    """The sampled-hyperparameter columns (dotted names such as ``solver.lr``)."""
    return [c for c in df.columns if c not in BASE_COLUMNS and c not in RUN_COLUMNS]


def collapse_runs(store: ExperimentStore, df: pd.DataFrame) -> pd.DataFrame:
    """One row per run (a trial and those promoted from it): its latest trial with a score, else its latest,
    with ``stages`` ("coarse>medium>fine") and ``lineage`` ("fine-0000 <- medium-0013", "" for one trial)."""
    runs = chains(dict(store.iter_trials()))
    scored = set(df.loc[df["val_acc"].notna(), "trial"])
    shown = {}
    for chain in runs.values():
        tid = next((t for t in reversed(chain) if t in scored), chain[-1])
        shown[tid] = chain
    out = df[df["trial"].isin(shown)].reset_index(drop=True)
    stage_of = dict(zip(df["trial"], df["stage"]))
    at = out.columns.get_loc("stage") + 1
    out.insert(at, "stages", [">".join(stage_of.get(t, "?") for t in shown[tid]) for tid in out["trial"]])
    out.insert(at + 1, "lineage", [label(shown[tid]) if len(shown[tid]) > 1 else "" for tid in out["trial"]])
    return out


def _short_labels(names: list[str]) -> dict[str, str]:
    """Last dotted component of each name where that is unambiguous, else the full name."""
    last = [n.rsplit(".", 1)[-1] for n in names]
    return {n: (s if last.count(s) == 1 else n) for n, s in zip(names, last)}


def _cell(value: Any, fmt: str = "{:.3g}") -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, float):
        return fmt.format(value)
    return str(value)


def render_table(df: pd.DataFrame, top: int = 10, title: str | None = None, width: int | None = None) -> Table:
    """A rich table of the best ``top`` rows: trial, state, val and train accuracy, best epoch, epochs done,
    seconds, hyperparameters (with, below them, why a trial did not complete and its run's lineage), and the
    worker unless the terminal is narrower than ``WIDE`` columns (a crop there would cut hyperparameter values)."""
    shown = df.head(top)
    params = param_columns(df)
    labels = _short_labels(params)
    table = Table(title=title or f"top {min(top, len(df))} of {len(df)} trials", title_justify="left",
                  box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
    for name in ("trial", "state"):
        table.add_column(name, no_wrap=True, min_width=max([len(name)] + [len(str(v)) for v in shown[name]]))
    for name in ("val", "train", "best ep", "epochs", "secs"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("hyperparameters", overflow="fold", min_width=16)
    with_worker = width is None or width >= WIDE
    if with_worker:
        table.add_column("worker", overflow="ellipsis", no_wrap=True, max_width=16)
    for values in shown.to_dict("records"):
        style = STATE_STYLES.get(values["state"], "")
        details = Text(" ".join(f"{labels[n]}={_cell(values[n])}" for n in params if _cell(values[n]) != "-"))
        if values["state"] != TrialState.COMPLETED.value and values["reason"]:
            details.append(f"\n{values['reason']}", style=style or None)
        if values.get("lineage"):
            details.append(f"\nrun {values['lineage']}", style="dim")
        table.add_row(
            values["trial"], Text(values["state"], style=style), _cell(values["val_acc"], "{:.4f}"),
            _cell(values["train_acc"], "{:.4f}"), _cell(values["best_epoch"]), _cell(values["epochs"]),
            _cell(values["seconds"], "{:.1f}"), details, *([_cell(values["worker"])] if with_worker else []))
    return table


def funnel(df: pd.DataFrame, stages: list[str]) -> pd.DataFrame:
    """Trials per stage (rows, in stage order) and state (columns, in life-cycle order)."""
    counts = pd.crosstab(df["stage"], df["state"])
    order = [s.value for s in (TrialState.COMPLETED, TrialState.KILLED, TrialState.DIVERGED, TrialState.FAILED,
                               TrialState.RUNNING, TrialState.QUEUED)]
    columns = [s for s in order if s in counts.columns] + sorted(set(counts.columns) - set(order))
    return counts.reindex(index=[s for s in stages if s in counts.index], columns=columns, fill_value=0)


def state_counts(df: pd.DataFrame, store: ExperimentStore) -> Table:
    """Trials per stage (rows, in the config's order) and state (columns), with each stage's recorded status."""
    table = Table(title="trials by state", title_justify="left")
    stages = stage_order(store, df["stage"])
    counts = funnel(df, stages)
    for name in ("stage", "status", *counts.columns, "total"):
        table.add_column(name, justify="left" if name in ("stage", "status") else "right")
    for stage, row in counts.iterrows():
        record = store.read_stage(stage)
        table.add_row(stage, record.status.value if record else "-", *map(str, row), str(row.sum()))
    return table


def running_table(df: pd.DataFrame, live: dict[str, dict[str, Any]], workers: list[dict[str, Any]]) -> Table:
    """Live progress of the running trials, from Redis."""
    table = Table(title=f"running now ({len(workers)} workers on the queue)", title_justify="left")
    for name in ("trial", "epoch", "val acc", "best", "samples/s", "worker", "updated"):
        table.add_column(name, justify="left" if name in ("trial", "worker") else "right")
    now = time.time()
    for tid in df.loc[df["state"] == TrialState.RUNNING.value, "trial"]:
        p = live.get(tid, {})
        fmt = lambda key, spec: format(p[key], spec) if isinstance(p.get(key), (int, float)) else "-"  # noqa: E731
        table.add_row(tid, f"{p.get('epoch', '-')}/{p.get('epochs', '-')}", fmt("val_acc", ".4f"),
                      fmt("best_val_acc", ".4f"), fmt("samples_per_sec", ".0f"), str(p.get("worker", "-")),
                      f"{now - p['updated']:.0f}s ago" if isinstance(p.get("updated"), (int, float)) else "-")
    return table
