"""Speedup and utilization of 1 vs 2 local worker processes on the same digits trials, through real Redis."""
from __future__ import annotations

import argparse
import logging

from harness import DEFAULT_URL, Cluster
from threadpoolctl import threadpool_info

from worker.spec import TrialSpec

HIDDEN = ([64], [128], [256], [128, 64])


def digits_specs(experiment: str, n: int, epochs: int) -> list[TrialSpec]:
    """``n`` digits MLP trials of a few sizes and learning rates (the same list for every worker count)."""
    return [TrialSpec(experiment=experiment, trial_id=f"coarse-{i:04d}", stage="coarse", dataset="digits",
                      model={"hidden": HIDDEN[i % len(HIDDEN)]},
                      solver={"update": "adam", "lr": 10 ** (-3 + (i % 3) * 0.5), "batch_size": 64},
                      epochs=epochs, seed=i, keep=1, data={"preprocess": "standardize"}) for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=DEFAULT_URL, help="a real Redis (keys are tagged and removed afterwards)")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    batches = {}
    for workers in (1, 2):
        with Cluster(args.url, workers) as cluster:
            where = cluster.describe()
            cluster.run(digits_specs(cluster.experiment("warmup"), workers, 1))  # imports, dataset cache
            batches[workers] = cluster.run(digits_specs(cluster.experiment("scaling"), args.trials, args.epochs))

    blas = [f"{i['internal_api']} {i.get('version')} ({i.get('architecture')})" for i in threadpool_info()
            if i["user_api"] == "blas"]
    print(f"worker scaling: {args.trials} digits MLP trials x {args.epochs} epochs through {where}; "
          f"each worker 1 BLAS thread; BLAS here: {', '.join(blas) or 'unknown'}")
    print(f"{'workers':<9}{'wall s':>9}{'trials/s':>10}{'in-job s':>10}{'utilization':>13}")
    for workers, b in batches.items():
        print(f"{workers:<9}{b.wall:>9.2f}{b.trials_per_sec:>10.2f}{sum(b.in_job):>10.2f}{b.utilization:>12.1%}")
    speedup = batches[1].wall / batches[2].wall
    print(f"speedup 2 vs 1 workers: {speedup:.2f}x (target >= 1.8x); utilization with 2 workers "
          f"{batches[2].utilization:.1%} (target >= 95%)")


if __name__ == "__main__":
    main()
