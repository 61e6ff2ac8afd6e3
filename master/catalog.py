"""The experiments of a storage root with their state and best run, and the best run's config as a TOML to relaunch."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from master.experiment import ExperimentError, stage_order
from master.leaderboard import build_leaderboard, collapse_runs
from rich.table import Table

from worker.store import ExperimentStore, list_experiments


def best_run(store: ExperimentStore) -> dict[str, Any]:
    """The leaderboard row of the run with the best validation accuracy; ExperimentError when none has a score."""
    runs = collapse_runs(store, build_leaderboard(store)) if store.trial_ids() else None
    if runs is None or runs.empty or not math.isfinite(runs["val_acc"].iloc[0]):
        raise ExperimentError(f"experiment {store.experiment}: no trial has a validation accuracy yet")
    return runs.iloc[0].to_dict()


def experiments(root: Path) -> list[dict[str, Any]]:
    """One summary per experiment of ``root`` (most recently changed first): stages and their status, trials, best.
    ExperimentError when ``root`` is not a directory."""
    if not root.is_dir():
        raise ExperimentError(f"storage {root}: {'not a directory' if root.exists() else 'does not exist'}")
    out = []
    for name in list_experiments(root):
        store = ExperimentStore(root, name)
        records = [r for stage in stage_order(store, store.stage_names()) if (r := store.read_stage(stage)) is not None]
        try:
            best = best_run(store)
            best_text = f"{best['val_acc']:.4f} ({best['trial']})"
        except ExperimentError:
            best_text = "-"
        out.append({"experiment": name, "state": ", ".join(f"{r.stage} {r.status.value}" for r in records) or "-",
                    "trials": len(store.trial_ids()), "best": best_text})
    return out


def experiments_table(root: Path) -> Table:
    """The experiments of ``root`` as a rich table."""
    table = Table(title=f"experiments in {root}", title_justify="left")
    for name in ("experiment", "state", "trials", "best"):
        table.add_column(name, justify="right" if name == "trials" else "left")
    for row in experiments(root):
        table.add_row(*(str(row[k]) for k in ("experiment", "state", "trials", "best")))
    return table


def _toml_value(value: Any) -> str:
    """A TOML literal for a JSON value (strings, numbers, booleans, lists of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def best_config(store: ExperimentStore) -> tuple[dict[str, Any], str]:
    """The best run's full spec, and an experiment TOML with that configuration fixed (one stage of one trial,
    the run's epoch budget) that `master launch --config` runs again."""
    row = best_run(store)
    spec = store.read_spec(row["trial"]) or {}
    epochs = spec.get("epochs", 1)
    lines = [f"# the best run of experiment {store.experiment}: {row['lineage'] or row['trial']}, "
             f"val accuracy {row['val_acc']:.4f}", "", "[experiment]",
             f"name = {_toml_value(store.experiment + '-best')}",
             f"dataset = {_toml_value(spec.get('dataset', 'digits'))}", f"seed = {spec.get('seed', 0)}"]
    for section in ("data", "model", "solver"):
        table = {k: v for k, v in (spec.get(section) or {}).items() if not (section == "solver" and k == "epochs")}
        lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in sorted(table.items())]
    lines += ["", "[stages.final]", f"epochs = {epochs}", "trials = 1", ""]
    return spec, "\n".join(lines)


def best_text(store: ExperimentStore, as_toml: bool) -> str:
    """The best run's spec as JSON, or (``as_toml``) the experiment TOML that runs it again."""
    spec, toml = best_config(store)
    return toml if as_toml else json.dumps(spec, indent=2)
