"""Per-epoch cost of recording a 1,000-epoch trial's history: rewriting history.jsonl whole every epoch (atomic
temp + fsync + rename, as at commit 21dfb94) beside appending one fsynced line (now), on the same disk.

Usage: python benchmarks/history_writes.py [--epochs 1000] [--line-bytes 430] [--dir DIR]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from worker.store import append_jsonl, write_jsonl


def record(epoch: int, line_bytes: int) -> dict:
    """A history record of about ``line_bytes`` bytes (real lines carry babysitting histograms)."""
    return {"epoch": epoch, "train_loss": 0.5, "val_acc": 0.9, "pad": "x" * max(0, line_bytes - 60)}


def timed(write, epochs: int, line_bytes: int) -> list[float]:
    """Seconds each epoch's write took."""
    history, out = [], []
    for epoch in range(1, epochs + 1):
        history.append(record(epoch, line_bytes))
        started = time.perf_counter()
        write(history)
        out.append(time.perf_counter() - started)
    return out


def main() -> None:
    """Time both write patterns and print a Markdown row for each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--line-bytes", type=int, default=430)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        whole, appended = Path(d) / "whole.jsonl", Path(d) / "appended.jsonl"
        rows = {"rewrite whole (before)": timed(lambda h: write_jsonl(whole, h), args.epochs, args.line_bytes),
                "append one line (after)": timed(lambda h: append_jsonl(appended, h[-1]), args.epochs,
                                                 args.line_bytes)}
        size = whole.stat().st_size
    print(f"{args.epochs} epochs, {args.line_bytes}-byte lines, final file {size / 1e6:.2f} MB")
    print("| pattern | median ms/epoch | last 100 epochs ms/epoch | total s | bytes written |")
    print("|---|---|---|---|---|")
    for name, secs in rows.items():
        written = size * (args.epochs + 1) / 2 if "whole" in name else size
        print(f"| {name} | {statistics.median(secs) * 1e3:.2f} | {statistics.mean(secs[-100:]) * 1e3:.2f} | "
              f"{sum(secs):.2f} | {written / 1e6:,.1f} MB |")


if __name__ == "__main__":
    main()
