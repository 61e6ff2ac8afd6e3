"""Runs: a trial and the trials promoted from it (``spec.parent``) are one run, with one continuous history."""
from __future__ import annotations

from typing import Any

from worker.store import ExperimentStore


def chains(specs: dict[str, dict[str, Any]]) -> dict[str, tuple[str, ...]]:
    """{latest trial of each run: its trials, oldest first}; a trial promoted twice starts two runs."""
    parent = {tid: spec.get("parent") for tid, spec in specs.items()}
    promoted = {p for p in parent.values() if p in specs}
    out = {}
    for leaf in (tid for tid in specs if tid not in promoted):
        chain = [leaf]
        while (up := parent.get(chain[-1])) in specs and up not in chain:
            chain.append(up)
        out[leaf] = tuple(reversed(chain))
    return out


def chain_to(runs: dict[str, tuple[str, ...]], trial: str) -> tuple[str, ...]:
    """The trials of ``trial``'s run up to ``trial`` itself (oldest first); ``(trial,)`` when it is in no run."""
    chain = next((c for c in runs.values() if trial in c), (trial,))
    return chain[:chain.index(trial) + 1]


def label(chain: tuple[str, ...]) -> str:
    """How a run is named: ``fine-0000 <- medium-0013 <- coarse-0002`` (latest first)."""
    return " <- ".join(reversed(chain))


def run_history(store: ExperimentStore, chain: tuple[str, ...]) -> list[dict[str, Any]]:
    """The run's epochs: the latest trial's history, preceded by each ancestor's epochs before it started."""
    records = store.read_history(chain[-1])
    for tid in reversed(chain[:-1]):
        first = min((r["epoch"] for r in records), default=float("inf"))
        records = [r for r in store.read_history(tid) if r["epoch"] < first] + records
    return records
