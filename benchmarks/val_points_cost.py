"""What sub-epoch validation points cost: an epoch's wall time with val_points = 8 against 1, side by side.

Usage: python benchmarks/val_points_cost.py [--tasks digits,spiral6,noisywaves] [--rounds 5] [--markdown]

For each task of staged_vs_flat.py (its data and fixed settings, a middle configuration of the wide space: lr 1e-3,
hidden [128]), the worker's own run_trial trains 3 epochs with val_points = 1, then with 8, in turn, ``--rounds``
times, on one BLAS thread. An epoch's time is the Solver's "seconds" (the minibatch loop and the end-of-epoch
evaluation, with the subset scored 7 more times inside the loop for 8 points); epochs 2 and 3 are kept. Reported:
the median epoch seconds of each and the median of the per-round ratios (both runs of a round under the same load).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from master.config import parse_config
from staged_vs_flat import GENERATED, TASKS, RuleControl
from master.pruning import Rule
from worker.store import ExperimentStore
from worker.trainer import run_trial

STAGE = '[stages.coarse]\nepochs = 3\ntrials = 1\nprune = "none"\n[model]\nhidden = [128]\n'


def epoch_seconds(task: str, points: int, tmp: Path, run: int) -> list[float]:
    """The seconds of epochs 2 and 3 of one 3-epoch trial of ``task`` with ``val_points`` = ``points``."""
    text = TASKS[task].format(name=f"{task}-{points}-{run}", seed=0, data=tmp)
    if "[model]" in text:  # the conv1d tasks have their own model table: add hidden to it
        text = text.replace("[model]\n", "[model]\nhidden = [128]\n") + STAGE.replace("[model]\nhidden = [128]\n", "")
    else:
        text += STAGE
    config = parse_config(text)
    spec = config.trial_spec("coarse", 0, 1, {"solver.lr": 1e-3})
    spec = dataclasses.replace(spec, solver={**spec.solver, "val_points": points})
    store = ExperimentStore(tmp, config.name).ensure()
    store.write_spec(spec.to_dict())
    run_trial(spec, store, RuleControl(store, spec.trial_id, [], Rule.of(config.stages[0], config.watch, 0, 0)))
    return [r["seconds"] for r in store.read_history(spec.trial_id)[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digits,spiral6,noisywaves")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    threadpool_limits(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hs-valpoints-") as tmp:
        for task in args.tasks.split(","):
            if task in GENERATED:
                x, y = GENERATED[task]()
                np.savez(Path(tmp) / f"{task}.npz", x=x, y=y)
            one, eight, ratios = [], [], []
            for run in range(args.rounds):
                a = epoch_seconds(task, 1, Path(tmp), run)
                b = epoch_seconds(task, 8, Path(tmp), run)
                one += a
                eight += b
                ratios.append(statistics.median(b) / statistics.median(a))
            rows.append((task, statistics.median(one), statistics.median(eight), statistics.median(ratios)))
            print(f"{task}: {rows[-1][1]:.3f} s, {rows[-1][2]:.3f} s, ratio {rows[-1][3]:.2f}", file=sys.stderr)
    if args.markdown:
        print("| task | epoch, val_points = 1 (s) | epoch, val_points = 8 (s) | ratio (median of rounds) |")
        print("|---|---|---|---|")
        for task, a, b, r in rows:
            print(f"| {task} | {a:.3f} | {b:.3f} | {r:.2f} |")


if __name__ == "__main__":
    main()
