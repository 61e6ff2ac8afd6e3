"""Test-accuracy gain of top-k ensembles over the best single model (chosen on validation) after a real digits search.

Usage: python benchmarks/ensemble_gain.py [--seeds 0,1,2,3,4] [--trials 24] [--epochs 15] [--top 5] [--markdown]

Each seed runs a random search of the built-in digits config (log-uniform lr and reg, dropout, hidden sizes;
Adam) in-process with worker.trainer.run_trial, one BLAS thread, then builds ensembles of the best trials:
softmax average, greedy selection (Caruana et al., 2004) over twice as many trials, average with each
member's 3 best checkpoints, and average of the EMA parameters. The gain is the ensemble's test accuracy
minus that of the member with the best validation accuracy (the model one would deploy without ensembling).
"""
import argparse
import dataclasses
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

from threadpoolctl import threadpool_limits

from master.ensemble import build_ensemble
from master.sampler import sample_trials
from master.config import StageConfig, load_config
from worker.control import NullControl
from worker.store import ExperimentStore
from worker.trainer import run_trial


def variants(top: int) -> dict[str, dict]:
    return {"average": {"top": top}, "greedy": {"top": 2 * top, "method": "greedy"},
            "average, 3 snapshots": {"top": top, "snapshots": 3}, "average, EMA": {"top": top, "ema": True}}


def search(root: Path, seed: int, trials: int, epochs: int) -> ExperimentStore:
    config = load_config(None)
    config = dataclasses.replace(config, name=f"gain-{seed}", seed=seed,
                                 stages=(StageConfig("coarse", epochs=epochs, trials=trials),))
    store = ExperimentStore(root, config.name).ensure()
    for spec in sample_trials(config, "coarse", trials):
        run_trial(spec, store, NullControl())
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--markdown", action="store_true", help="print RESULTS.md rows")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    gains: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants(args.top)}
    with tempfile.TemporaryDirectory(prefix="hs-gain-") as tmp, threadpool_limits(1):
        for seed in seeds:
            started = time.perf_counter()
            store = search(Path(tmp), seed, args.trials, args.epochs)
            print(f"seed {seed}: {args.trials} trials x {args.epochs} epochs in {time.perf_counter() - started:.0f}s")
            for name, options in variants(args.top).items():
                test = build_ensemble(store, **options)["scores"]["test"]
                gains[name].append((test["ensemble"], test["best_single"], test["gain"]))
                print(f"  {name:22s} test {test['ensemble']:.4f}  best single {test['best_single']:.4f}  "
                      f"gain {100 * test['gain']:+.2f} pts")
    print(f"\nmean over seeds {seeds} (digits: 270 test samples per seed, 1 sample = 0.37 pts):")
    for name, rows in gains.items():
        ens, single, gain = (statistics.mean(col) for col in zip(*rows))
        spread = statistics.stdev(r[2] for r in rows) if len(rows) > 1 else 0.0
        print(f"  {name:22s} ensemble {ens:.4f}  best single {single:.4f}  gain {100 * gain:+.2f} "
              f"+- {100 * spread:.2f} pts")
        if args.markdown:
            print(f"| {date.today()} | {name} | top {variants(args.top)[name]['top']} of {args.trials} | "
                  f"{ens:.4f} | {single:.4f} | {100 * gain:+.2f} +- {100 * spread:.2f} |")


if __name__ == "__main__":
    main()
