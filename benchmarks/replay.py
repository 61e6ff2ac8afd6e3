"""Coarse-to-fine against flat random search, replayed on recorded learning curves in seconds instead of minutes.

Usage: python benchmarks/replay.py record [--tasks digits,spiral6,noisywaves] [--configs 64]
       python benchmarks/replay.py scores [--tasks digits,spiral6,noisywaves]
       python benchmarks/replay.py replay [--tasks digits,spiral6,noisywaves] [--seeds 0,...,19]
              [--plans default,hedged,...] [--draws paired|independent]

``record`` trains --configs configurations per task, sampled from staged_vs_flat.py's wide space (seed 1000), to 30
epochs each with the worker's own run_trial (no pruning) and writes their parameters and validation curves to
benchmarks/curves/<task>.json (small files, kept in the repository). ``replay`` runs, per seed, flat search (32
trials x 30 epochs; with --draws paired, the default, the very configurations the staged plans screen first, as
staged_vs_flat.py pairs them) and each staged plan with the product's own code on those curves: master.stages plans
every stage (sampling, narrowing, promotion), master.pruning's ASHA rule stops trials at the end of an epoch against
the trials before them, master.monitor closes each stage; a trial "trains" by copying the curve of the recorded
configuration NEAREST to it (Euclidean distance in the sampled unit scale, a different choice counting 1) — an
approximation, stated as such: the replay knows only the recorded configurations, so a narrowed range finds the
nearest of them, not a new network. Clock: one tick per epoch. Reported per task: runs whose staged best is within
0.5 points of flat's best, epochs spent relative to flat (total), runs reaching flat's target at least 5x sooner
than flat does in an average order of its trials."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from master.config import ExperimentConfig, parse_config
from master.hedge import screen_length
from master.monitor import close_stage
from master.pruning import Rule, TrialView, should_kill
from master.sampler import sample_trials
from staged_vs_flat import (DRAWS, EPOCHS, GENERATED, PLANS, SPACES, TASKS, TARGET_RATIO, TOLERANCE, RuleControl,
                            begin_stage, epochs_to, expected_epochs_to, flat_stages, run_search)
from worker.trainer import run_trial
from worker.states import TrialState
from worker.store import ExperimentStore

CURVES = Path(__file__).resolve().parent / "curves"
RECORD_SEED = 1000
POINTS, POINT_EPOCHS = 8, 2  # record-points: sub-epoch validation points per epoch, over the first epochs


def record(task: str, configs: int, tmp: Path) -> Path:
    """Train ``configs`` configurations of ``task`` to 30 epochs; write their params and curves, and the
    sub-epoch validation points of their first POINT_EPOCHS epochs (the solver's ``val_points`` = POINTS: the
    accuracy on a fixed validation subset after every eighth of an epoch), from a second run of those epochs with
    the same seed, which must reproduce the curve (scoring the subset does not change the training)."""
    if task in GENERATED:
        x, y = GENERATED[task]()
        np.savez(tmp / f"{task}.npz", x=x, y=y)
    config = parse_config(TASKS[task].format(name=f"{task}-record", seed=RECORD_SEED, data=tmp)
                          + flat_stages(configs, "independent") + SPACES["wide"])
    run_search(config, tmp)
    store = ExperimentStore(tmp, config.name)
    rows = []
    for spec in sample_trials(config, "flat", configs):
        result = store.read_result(spec.trial_id)
        rows.append({"params": spec.params, "state": result.state.value,
                     "curve": [round(r["val_acc"], 6) for r in store.read_history(spec.trial_id)]})
    points = ExperimentStore(tmp, f"{task}-points").ensure()
    rule = Rule.of(config.stages[0], config.watch, 0, 0)  # the first stage's, as begin_stage gives run_search
    for row, spec in zip(rows, sample_trials(config, "flat", configs)):
        spec = dataclasses.replace(spec, experiment=points.experiment, epochs=POINT_EPOCHS,
                                   solver={**spec.solver, "val_points": POINTS})
        points.write_spec(spec.to_dict())
        run_trial(spec, points, RuleControl(points, spec.trial_id, [], rule))
        history = points.read_history(spec.trial_id)
        if [round(r["val_acc"], 6) for r in history] != row["curve"][:len(history)]:
            raise SystemExit(f"{task} {spec.trial_id}: its {len(history)} epochs with val_points differ from its curve")
        row["points"] = [[at, round(acc, 6)] for r in history for at, acc in r["val_points"]]
    return write_table(task, {"task": task, "space": "wide", "epochs": EPOCHS, "seed": RECORD_SEED, "configs": rows})


def write_table(task: str, doc: dict[str, Any]) -> Path:
    """Write ``task``'s recorded table atomically, as compact JSON (a small file kept in the repository)."""
    CURVES.mkdir(exist_ok=True)
    path = CURVES / f"{task}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    os.replace(tmp, path)
    return path


class Table:
    """Recorded curves of one task and the nearest recorded configuration to any sampled one."""

    def __init__(self, doc: dict[str, Any], config: ExperimentConfig):
        self.rows = doc["configs"]
        self.space = config.space  # the wide space the table was sampled from: distances use its unit scale

    def unit(self, params: dict[str, Any]) -> list[Any]:
        return [d.to_unit(params[d.name]) if d.dist != "choice" else params[d.name] for d in self.space]

    def nearest(self, params: dict[str, Any]) -> dict[str, Any]:
        mine = self.unit(params)

        def distance(row: dict[str, Any]) -> float:
            theirs = self.unit(row["params"])
            return sum((a - b) ** 2 if not isinstance(a, list) else float(a != b) for a, b in zip(mine, theirs))
        return min(self.rows, key=distance)


def simulate(config: ExperimentConfig, table: Table, root: Path) -> list[list[float]]:
    """Run every stage of ``config`` with the product's planner and ASHA rule on the table's curves; returns
    each trial's accuracies per epoch it trained, in execution order."""
    store = ExperimentStore(root, config.name).ensure()
    trials, clock = [], 0.0
    for stage in config.stages:
        plan, ids, start, rule = begin_stage(store, config, stage)
        for i, spec in enumerate(plan.specs):
            store.write_spec(spec.to_dict())
            row = table.nearest(spec.params)
            history = store.read_history(spec.parent) if spec.parent else []
            store.write_history(spec.trial_id, history)
            store.transition(spec.trial_id, TrialState.RUNNING, "replay", "started")
            peers = [TrialView.from_history(p, store.read_history(p)) for p in ids[:i]]
            state, reason = TrialState.COMPLETED, ""
            for epoch in range(start + 1, stage.epochs + 1):
                if epoch > len(row["curve"]):
                    state, reason = TrialState(row["state"]), "recorded curve ends here"
                    break
                clock += 1
                history.append({"epoch": epoch, "val_acc": row["curve"][epoch - 1], "time": clock})
                store.append_history(spec.trial_id, history[-1])
                verdict = should_kill(TrialView.from_history(spec.trial_id, history), peers, rule, clock)
                if verdict is not None:
                    state, reason = verdict.state, verdict.reason
                    break
            accs = [h["val_acc"] for h in history]
            best = int(np.argmax(accs)) if accs else 0
            store.transition(spec.trial_id, state, reason, "finished", best_val_acc=accs[best] if accs else 0.0,
                             best_epoch=best + 1, epochs_done=len(history))
            trials.append([h["val_acc"] for h in history if h["epoch"] > start])
        close_stage(store, config, stage.name, "")
    return trials


def replay(tasks: list[str], seeds: list[int], plans: list[str], screens: dict[str, list[int | None]],
           draws: str = "paired") -> list[tuple[Any, ...]]:
    """Flat search and every plan of ``plans`` per task and seed; one row per (task, plan, seed). ``screens``
    gets, per task, the screen length master.hedge's rule picks from flat search's 32 full curves, per seed."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="hs-replay-") as tmp:
        for task in tasks:
            doc = json.loads((CURVES / f"{task}.json").read_text())
            for seed in seeds:
                base = TASKS[task].format(name=f"{task}-flat-{seed}", seed=seed, data=tmp)
                flat_config = parse_config(base + flat_stages(32, draws) + SPACES["wide"])
                table = Table(doc, flat_config)
                flat = [table.nearest(s.params)["curve"]
                        for s in sample_trials(flat_config, flat_config.stages[0].name, 32)]
                target = max(max(c, default=0.0) for c in flat) - TOLERANCE
                flat_any = expected_epochs_to(flat, target, draws=500)
                screens.setdefault(task, []).append(screen_length(flat, rungs=(1, 2, 4, 8, 16, 30)))
                for plan in plans:
                    config = parse_config(TASKS[task].format(name=f"{task}-{plan}-{seed}", seed=seed, data=tmp)
                                          + PLANS[plan](32) + SPACES["wide"])
                    staged = simulate(config, table, Path(tmp))
                    rows.append((task, plan, seed, target + TOLERANCE, max(max(c, default=0) for c in staged),
                                 sum(map(len, flat)), sum(map(len, staged)), flat_any, epochs_to(staged, target)))
    return rows


def fit_at(points: list[list[float]], at: float) -> float:
    """The least-squares line through ``points`` ([[epochs, accuracy], ...]) read at ``at`` epochs."""
    t, acc = np.array(points).T
    slope, intercept = np.polyfit(t, acc, 1)
    return float(slope * at + intercept)


SCREEN_SCORES = {  # rung epoch r, the row's recorded curve and sub-epoch points -> the score a promotion ranks by
    "end of epoch (full val set)": lambda r, curve, pts: curve[r - 1],
    "mean of the epoch's last 4 points": lambda r, curve, pts: float(np.mean([a for _, a in pts[r * POINTS - 4:
                                                                                             r * POINTS]])),
    "line through the epoch's 8 points, at its end": lambda r, curve, pts: fit_at(pts[(r - 1) * POINTS:r * POINTS], r),
    "line through the epoch's 8 points, one epoch on": lambda r, curve, pts: fit_at(pts[(r - 1) * POINTS:r * POINTS],
                                                                                    r + 1),
    "line through all points so far, at the end": lambda r, curve, pts: fit_at(pts[:r * POINTS], r),
}


def screen_scores(tasks: list[str], rungs: tuple[int, ...] = (1, 2), keeps: tuple[int, ...] = (16, 8), top: int = 3,
                  draws: int = 2000) -> list[str]:
    """How well each of SCREEN_SCORES at a rung predicts a configuration's best accuracy over 30 epochs, on the
    recorded tables (configurations that completed): Spearman's rank correlation, and, over ``draws`` sets of 32
    configurations drawn at random, how many of a set's best ``top`` a promotion of ``keep`` by the score keeps
    and how often it keeps the set's best."""
    head = " | ".join(f"of the best {top} of 32, kept in the top {k} | the best kept in the top {k}" for k in keeps)
    lines = [f"| task | rung | score | Spearman | {head} |", "|---" * (4 + 2 * len(keeps)) + "|"]
    rng = np.random.default_rng(0)
    for task in tasks:
        rows = [r for r in json.loads((CURVES / f"{task}.json").read_text())["configs"]
                if r["state"] == "COMPLETED" and len(r.get("points", ())) == POINT_EPOCHS * POINTS]
        final = np.array([max(r["curve"]) for r in rows])
        subsets = [rng.choice(len(rows), 32, replace=False) for _ in range(draws)]
        best = [set(sub[np.argsort(-final[sub], kind="stable")[:top]]) for sub in subsets]
        for rung in rungs:
            for name, score in SCREEN_SCORES.items():
                pred = np.array([score(rung, r["curve"], r["points"]) for r in rows])
                rho = float(np.corrcoef(np.argsort(np.argsort(pred)), np.argsort(np.argsort(final)))[0, 1])
                cells = []
                for keep in keeps:
                    kept = [set(sub[np.argsort(-pred[sub], kind="stable")[:keep]]) for sub in subsets]
                    winner = [sub[np.argmax(final[sub])] in k for sub, k in zip(subsets, kept)]
                    cells += [f"{np.mean([len(b & k) for b, k in zip(best, kept)]):.2f}", f"{np.mean(winner):.3f}"]
                lines.append(f"| {task} | {rung} | {name} | {rho:.3f} | {' | '.join(cells)} |")
    return lines


def summary(rows: list[tuple[Any, ...]]) -> list[str]:
    """One Markdown row per (task, plan): runs within 0.5 points, epochs vs flat, runs at >= 5x."""
    lines = ["| task | plan | runs | within 0.5 points of flat's best | staged epochs / flat epochs (median, max) "
             "| runs at >= 5x (flat any order) | median staged best - flat best (points) |", "|---" * 7 + "|"]
    for key in dict.fromkeys((r[0], r[1]) for r in rows):
        mine = [r for r in rows if (r[0], r[1]) == key]
        within = sum(r[4] >= r[3] - TOLERANCE - 1e-12 for r in mine)
        share = [r[6] / r[5] for r in mine]
        fast = sum(math.isfinite(r[8]) and r[7] / r[8] >= TARGET_RATIO for r in mine)
        gap = statistics.median(100 * (r[4] - r[3]) for r in mine)
        lines.append(f"| {key[0]} | {key[1]} | {len(mine)} | {within} | {statistics.median(share):.2f}, "
                     f"{max(share):.2f} | {fast} | {gap:+.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("record", "scores", "replay"))
    parser.add_argument("--tasks", default="digits,spiral6,noisywaves")
    parser.add_argument("--configs", type=int, default=64, help="record: configurations per task")
    parser.add_argument("--seeds", default=",".join(map(str, range(20))))
    parser.add_argument("--plans", default=",".join(PLANS), help=f"replay: comma-separated, of {', '.join(PLANS)}")
    parser.add_argument("--draws", choices=DRAWS, default="paired",
                        help="replay: flat search screens the staged search's first draws (paired) or its own")
    args = parser.parse_args()
    threadpool_limits(1)
    tasks = args.tasks.split(",")
    if args.command == "record":
        with tempfile.TemporaryDirectory(prefix="hs-record-") as tmp:
            for task in tasks:
                print(f"wrote {record(task, args.configs, Path(tmp))}", file=sys.stderr)
        return
    if args.command == "scores":
        print("\n".join(screen_scores(tasks)))
        return
    screens: dict[str, list[int | None]] = {}
    rows = replay(tasks, [int(s) for s in args.seeds.split(",")], args.plans.split(","), screens, args.draws)
    print("\n".join(summary(rows)))
    for task, found in screens.items():
        print(f"{task}: screen length picked by master.hedge.screen_length on flat search's 32 full curves "
              f"(rungs 1, 2, 4, 8, 16, 30; None: only epoch 30 ranks like epoch 30): {found}")


if __name__ == "__main__":
    main()
