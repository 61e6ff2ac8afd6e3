"""Per-trial dispatch overhead and trials/s of trivial trials through the real path, beside Optuna on SQLite."""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from harness import DEFAULT_URL, Batch, Cluster

from worker.spec import TrialSpec

# The cheapest real trial: the allow-listed train_trial on the 2-D spiral (210 training points), one epoch of
# one minibatch, a 4-unit MLP. It still parses the spec, trains, writes history, an npz checkpoint and
# result.json with fsync, and publishes progress; that in-job time is measured (RQ's started/ended stamps)
# and reported apart from the overhead, which is what the worker slots spend outside the job.
TRIVIAL = dict(stage="coarse", dataset="spiral", model={"hidden": [4]},
               solver={"batch_size": 256, "train_eval_samples": 16}, epochs=1, keep=1)


def trivial_specs(experiment: str, n: int) -> list[TrialSpec]:
    return [TrialSpec(experiment=experiment, trial_id=f"coarse-{i:04d}", seed=i, **TRIVIAL) for i in range(n)]


def optuna_sqlite(n: int) -> Batch | None:
    """Optuna's random sampler on SQLite storage with a trivial objective (None when optuna is absent)."""
    try:
        import optuna
    except ImportError:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        study = optuna.create_study(storage=f"sqlite:///{Path(tmp) / 'optuna.db'}",
                                    sampler=optuna.samplers.RandomSampler(seed=0))
        started = time.perf_counter()
        study.optimize(lambda t: t.suggest_float("x", -10, 10) ** 2, n_trials=n)
        wall = time.perf_counter() - started
    return Batch(n, 1, wall, [0.0] * n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=DEFAULT_URL, help="a real Redis (keys are tagged and removed afterwards)")
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--optuna-trials", type=int, default=300)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    rows = []
    for workers in (1, 2):
        with Cluster(args.url, workers) as cluster:
            where = cluster.describe()
            cluster.run(trivial_specs(cluster.experiment("warmup"), 20))  # imports, dataset cache, first files
            batch = cluster.run(trivial_specs(cluster.experiment("bench"), args.trials), poll=0.1)  # poll lightly
            rows.append((f"hypersearch, {workers} worker{'s' * (workers > 1)}", batch))
    optuna = optuna_sqlite(args.optuna_trials)

    print(f"dispatch overhead: {args.trials} trivial trials (real train_trial, spiral, 1 epoch of 1 minibatch) "
          f"through {where}, real `worker start` processes")
    print(f"{'setup':<30}{'trials/s':>10}{'wall s':>9}{'in-job ms':>11}{'overhead ms':>13}")
    for label, b in rows:
        print(f"{label:<30}{b.trials_per_sec:>10.1f}{b.wall:>9.2f}{b.in_job_ms:>11.2f}{b.overhead_ms:>13.2f}")
    if optuna is None:
        print("optuna not installed: baseline skipped")
        return
    print(f"{'optuna, SQLite, random, 1 proc':<30}{optuna.trials_per_sec:>10.1f}{optuna.wall:>9.2f}"
          f"{'-':>11}{1000 * optuna.wall / optuna.trials:>13.2f}")
    best = max(b.trials_per_sec for _, b in rows)
    overhead = min(b.overhead_ms for _, b in rows)
    print(f"trials/s vs optuna-SQLite: {best / optuna.trials_per_sec:.2f}x (target >= 2x); "
          f"lowest per-trial overhead {overhead:.2f} ms (target <= 5 ms)")


if __name__ == "__main__":
    main()
