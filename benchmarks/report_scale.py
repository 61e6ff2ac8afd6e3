"""Time and peak memory of `master report` on a synthetic shared storage of many trials (target: 10,000 in < 30 s).

Usage: python benchmarks/report_scale.py [--trials 10000] [--rounds 2] [--storage DIR] [--markdown]

The storage is written through worker.store (fsync skipped while generating, it is synthetic): three stages
(80% coarse with 1-2 epochs, 18% medium with 5, 2% fine with 20), every trial state, a history line per
epoch with losses, accuracies and per-layer update ratios, one small checkpoint per unfinished trial, stage
records with ranges and a border flag. Each round runs `master report` in a fresh process and reports its
wall time and peak resident memory (ru_maxrss of the child); the best round is kept.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from unittest import mock

import numpy as np

from worker.records import ExperimentRecord, StageRecord
from worker.states import StageStatus, TrialState
from worker.store import ExperimentStore

EXPERIMENT = "scale"
STAGES = (("coarse", 0.80, (1, 2)), ("medium", 0.18, (5, 5)), ("fine", 0.02, (20, 20)))
STATES = ("COMPLETED", "COMPLETED", "COMPLETED", "KILLED", "DIVERGED", "FAILED", "RUNNING", "QUEUED")
SPACE = {"solver": {"lr": {"dist": "loguniform", "low": 1e-4, "high": 1e-1},
                    "reg": {"dist": "loguniform", "low": 1e-6, "high": 1e-1}},
         "model": {"dropout": {"dist": "uniform", "low": 0.0, "high": 0.5},
                   "hidden": {"dist": "choice", "values": [[64], [128], [256, 128]]}}}


def generate(root: Path, trials: int, seed: int = 0) -> ExperimentStore:
    """Write the synthetic experiment under root."""
    rng = np.random.default_rng(seed)
    store = ExperimentStore(root, EXPERIMENT).ensure()
    with mock.patch("os.fsync"):
        store.write_experiment(ExperimentRecord(EXPERIMENT, {
            "stages": {name: {"epochs": hi, "trials": round(share * trials)} for name, share, (_, hi) in STAGES},
            "space": SPACE}, "", 0, "2026-01-01T00:00:00"))
        for name, share, (lo, hi) in STAGES:
            ranges = {f"{s}.{k}": d for s, entries in SPACE.items() for k, d in entries.items()}
            flags = ({"name": "solver.lr", "side": "upper", "best": 0.09, "low": 1e-4, "high": 0.1,
                      "new_low": 1e-3, "new_high": 0.4},) if name == "coarse" else ()
            store.write_stage(StageRecord(name, "random", hi, 0, (), StageStatus.LAUNCHED, ranges=ranges))
            store.set_stage_status(name, StageStatus.COMPLETED, flags=flags)
            for i in range(round(share * trials)):
                _trial(store, f"{name}-{i:05d}", name, int(rng.integers(lo, hi + 1)), rng)
    return store


def _trial(store: ExperimentStore, tid: str, stage: str, epochs: int, rng: np.random.Generator) -> None:
    lr, reg = 10 ** rng.uniform(-4, -1), 10 ** rng.uniform(-6, -1)
    params = {"solver.lr": lr, "solver.reg": reg, "model.dropout": rng.uniform(0, 0.5),
              "model.hidden": [[64], [128], [256, 128]][rng.integers(3)]}
    store.write_spec({"experiment": EXPERIMENT, "trial_id": tid, "stage": stage, "params": params})
    state = STATES[rng.integers(len(STATES))]
    if state == "QUEUED":
        return
    peak = 0.97 - 2 * abs(np.log10(lr) + 2.5) / 10 - rng.uniform(0, 0.05)
    history = [{"epoch": e, "train_loss": 2.3 / e, "val_loss": 2.4 / e, "train_acc": min(1.0, peak + 0.02),
                "val_acc": float(peak * (1 - 0.5 ** e)), "ema_val_acc": float(peak * (1 - 0.6 ** e)), "lr": lr,
                "update_ratio": {f"layer{k}": float(lr * rng.uniform(0.5, 2)) for k in (1, 2, 3)},
                "seconds": 0.2, "samples_per_sec": 6000.0, "time": 0.0} for e in range(1, epochs + 1)]
    store.write_history(tid, history)
    best = max(history, key=lambda r: r["val_acc"])
    store.transition(tid, TrialState.RUNNING, "synthetic", "started")
    if state == "RUNNING":
        store.write_checkpoint(tid, best["epoch"], best["val_acc"], {"w": np.zeros(4, np.float32)}, keep=1)
        return
    store.transition(tid, TrialState(state), state.lower(), "finished", best_val_acc=round(best["val_acc"], 4),
                     best_epoch=best["epoch"], epochs_done=epochs, worker=f"w{rng.integers(8)}", seconds=0.2 * epochs,
                     finished_at=0.0, checkpoint=None)


def run_report(root: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one `master report` process."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "master.cli", "report", "--experiment", EXPERIMENT,
                             "--storage", str(root)], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: ru_maxrss in KiB on Linux
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"master report failed with exit code {os.waitstatus_to_exitcode(status)}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--storage", type=Path, help="keep the synthetic storage here (default: a temp dir)")
    parser.add_argument("--markdown", action="store_true", help="print a RESULTS.md row")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hs-report-") as tmp:
        root = args.storage or Path(tmp)
        started = time.perf_counter()
        store = generate(root, args.trials)
        files = sum(len(files) for _, _, files in os.walk(store.dir))
        print(f"generated {args.trials} trials ({files} files) in {time.perf_counter() - started:.1f}s")
        runs = [run_report(root) for _ in range(args.rounds)]
        wall = min(w for w, _ in runs)
        peak = max(p for _, p in runs)
        html = store.report_dir / "index.html"
        print(f"master report: best of {args.rounds} {wall:.2f}s wall, peak RSS {peak:.0f} MiB, "
              f"index.html {html.stat().st_size / 1e6:.2f} MB, rounds {[round(w, 2) for w, _ in runs]}")
        if args.markdown:
            print(f"| {date.today()} | {args.trials:,} | {files:,} | {wall:.1f} s | {peak:.0f} MiB | "
                  f"{html.stat().st_size / 1e6:.1f} MB | {os.cpu_count()} CPUs |")


if __name__ == "__main__":
    main()
