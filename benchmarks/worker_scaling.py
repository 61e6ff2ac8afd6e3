"""Speedup and utilization of 1 vs 2 local worker processes on the same digits trials, through real Redis."""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import tempfile
import time
from typing import Any

from harness import DEFAULT_URL, Cluster
from threadpoolctl import threadpool_info, threadpool_limits

from worker.control import NullControl
from worker.spec import TrialSpec
from worker.store import ExperimentStore
from worker.trainer import run_trial

HIDDEN = ([64], [128], [256], [128, 64])


def digits_specs(experiment: str, n: int, epochs: int) -> list[TrialSpec]:
    """``n`` digits MLP trials of a few sizes and learning rates (the same list for every worker count)."""
    return [TrialSpec(experiment=experiment, trial_id=f"coarse-{i:04d}", stage="coarse", dataset="digits",
                      model={"hidden": HIDDEN[i % len(HIDDEN)]},
                      solver={"update": "adam", "lr": 10 ** (-3 + (i % 3) * 0.5), "batch_size": 64},
                      epochs=epochs, seed=i, keep=1, data={"preprocess": "standardize"}) for i in range(n)]


def _pin_blas() -> None:
    threadpool_limits(limits=1)


def _run_direct(job: tuple[dict[str, Any], str]) -> None:
    spec, root = job
    trial = TrialSpec.from_dict(spec)
    run_trial(trial, ExperimentStore(root, trial.experiment).ensure(), NullControl())


def direct(specs: list[TrialSpec], processes: int) -> float:
    """Wall seconds for ``specs`` run by plain processes (run_trial, no Redis, no RQ): the machine's own scaling."""
    with tempfile.TemporaryDirectory() as root, \
            multiprocessing.get_context("spawn").Pool(processes, initializer=_pin_blas) as pool:
        pool.map(_run_direct, [(s.to_dict(), f"{root}/warmup") for s in specs[:processes]], chunksize=1)
        started = time.perf_counter()
        pool.map(_run_direct, [(s.to_dict(), root) for s in specs], chunksize=1)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=DEFAULT_URL, help="a real Redis (keys are tagged and removed afterwards)")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    batches, plain = {}, {}
    for workers in (1, 2):
        with Cluster(args.url, workers) as cluster:
            where = cluster.describe()
            cluster.run(digits_specs(cluster.experiment("warmup"), workers, 1))  # imports, dataset cache
            batches[workers] = cluster.run(digits_specs(cluster.experiment("scaling"), args.trials, args.epochs))
        plain[workers] = direct(digits_specs("direct", args.trials, args.epochs), workers)

    _pin_blas()
    blas = [f"{i['internal_api']} {i.get('version')} ({i.get('architecture')})" for i in threadpool_info()
            if i["user_api"] == "blas"]
    print(f"worker scaling: {args.trials} digits MLP trials x {args.epochs} epochs through {where}; "
          f"each worker 1 BLAS thread; BLAS here: {', '.join(blas) or 'unknown'}")
    print(f"{'workers':<9}{'wall s':>9}{'trials/s':>10}{'in-job s':>10}{'utilization':>13}{'plain procs wall s':>20}")
    for workers, b in batches.items():
        print(f"{workers:<9}{b.wall:>9.2f}{b.trials_per_sec:>10.2f}{sum(b.in_job):>10.2f}{b.utilization:>12.1%}"
              f"{plain[workers]:>20.2f}")
    speedup, machine = batches[1].wall / batches[2].wall, plain[1] / plain[2]
    print(f"speedup 2 vs 1 workers: {speedup:.2f}x (target >= 1.8x); the same trials in plain processes "
          f"(no Redis/RQ): {machine:.2f}x; utilization with 2 workers {batches[2].utilization:.1%} (target >= 95%)")


if __name__ == "__main__":
    main()
