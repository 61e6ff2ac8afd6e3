"""Latency of the dashboard's JSON endpoints on a synthetic 10,000-trial experiment (target: state < 200 ms median).

Usage: python benchmarks/dashboard_scale.py [--trials 10000] [--requests 30] [--storage DIR] [--markdown]

The experiment is benchmarks/report_scale.py's (three stages, every trial state, per-epoch histories). The app runs
in this process through Flask's test client (no network, no Redis: storage alone). The first request reads every
trial (cold); then each of ``--requests`` requests re-lists the trial folders and re-reads what changed: between
requests, ``--touch`` running trials get one more epoch appended to their history, as live workers would.
"""
import argparse
import os
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path
from unittest import mock

from report_scale import EXPERIMENT, generate
from master.dashboard import RACY_NS, Dashboard, create_app
from worker.states import TrialState


def timed(client, url: str) -> tuple[float, int]:
    """(milliseconds, response bytes) of one GET."""
    started = time.perf_counter()
    response = client.get(url)
    elapsed = (time.perf_counter() - started) * 1000
    assert response.status_code == 200, response.get_data(as_text=True)[:300]
    return elapsed, len(response.get_data())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--touch", type=int, default=8, help="running trials given one more epoch between requests")
    parser.add_argument("--storage", type=Path, help="keep the synthetic storage here (default: a temp dir)")
    parser.add_argument("--markdown", action="store_true", help="print a RESULTS.md row")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hs-dash-") as tmp:
        root = args.storage or Path(tmp)
        started = time.perf_counter()
        # report_scale's generator writes its stage records straight as completed, which the store's stage life
        # cycle (launched first) now refuses; the records are synthetic, so the check is skipped while generating
        with mock.patch("worker.store.check_stage_transition"):
            store = generate(root, args.trials)
        print(f"generated {args.trials} trials in {time.perf_counter() - started:.1f}s")
        time.sleep(RACY_NS / 1e9)  # files younger than the racy window are read on every request
        client = create_app(Dashboard(root, EXPERIMENT, None, "default"), None).test_client()
        url = f"/api/e/{EXPERIMENT}/state"
        cold, size = timed(client, url)
        running = [t for t in store.trial_ids() if (r := store.read_result(t)) and r.state is TrialState.RUNNING]
        warm, scatter = [], []
        for i in range(args.requests):
            for tid in running[i * args.touch % max(1, len(running)):][:args.touch]:
                history = store.read_history(tid)
                store.append_history(tid, {**history[-1], "epoch": history[-1]["epoch"] + 1})
            warm.append(timed(client, url)[0])
            if i % 5 == 0:
                scatter.append(timed(client, f"/api/e/{EXPERIMENT}/scatter")[0])
        median = statistics.median(warm)
        print(f"state endpoint: cold {cold:.0f} ms, then median {median:.1f} ms (p90 "
              f"{sorted(warm)[int(0.9 * len(warm))]:.1f} ms) over {len(warm)} requests, {size / 1e3:.0f} kB; "
              f"scatter endpoint median {statistics.median(scatter):.0f} ms")
        if args.markdown:
            print(f"| {date.today()} | {args.trials:,} | {cold / 1000:.1f} s | **{median:.0f} ms** | "
                  f"{statistics.median(scatter):.0f} ms | {size / 1e3:.0f} kB | {os.cpu_count()} CPUs |")


if __name__ == "__main__":
    main()
