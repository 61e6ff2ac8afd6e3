"""Typed records of shared storage (a trial's state and outcome, a stage, the experiment), to and from JSON.

``from_dict`` raises RecordError naming the field when a stored document is not such a record (the store
turns that into a warning naming the file and skips it); ``to_dict`` gives the JSON document back.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

from worker.states import StageStatus, TrialState


class RecordError(ValueError):
    """A stored JSON document is not the record it should be; the message names the field."""


def _check(value: Any, types: type | tuple[type, ...], where: str, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise RecordError(f"{where}: expected {types}, got {value!r}")
    if not isinstance(value, types):
        raise RecordError(f"{where}: expected {getattr(types, '__name__', types)}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise RecordError(f"{where}: non-finite value {value!r}")
    return value


def _from_dict(cls: type, doc: Any, converters: dict[str, Any]) -> Any:
    """Build dataclass ``cls`` from ``doc``: unknown keys are kept out (records written by a newer version
    stay readable), missing optional ones take their defaults, each field is checked or converted."""
    if not isinstance(doc, dict):
        raise RecordError(f"{cls.__name__}: expected a JSON object, got {type(doc).__name__}")
    kwargs = {}
    for f in fields(cls):
        if f.name in doc:
            convert = converters.get(f.name)
            kwargs[f.name] = convert(doc[f.name], f.name) if convert else doc[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecordError(f"{cls.__name__}.{f.name}: missing")
    return cls(**kwargs)


def _enum(kind: type) -> Any:
    def convert(value: Any, where: str) -> Any:
        try:
            return kind(value)
        except ValueError:
            raise RecordError(f"{where}: {value!r} is not one of {', '.join(m.value for m in kind)}") from None
    return convert


def _typed(types: Any, optional: bool = False) -> Any:
    return lambda value, where: _check(value, types, where, optional)


def _number(value: Any, where: str) -> float:
    return float(_check(value, (int, float), where))


def _count(value: Any, where: str) -> int:
    return int(_check(value, int, where))


def _tables(value: Any, where: str) -> tuple[dict[str, Any], ...]:
    _check(value, list, where)
    return tuple(_check(v, dict, f"{where}[{i}]") for i, v in enumerate(value))


@dataclass(frozen=True)
class TrialResult:
    """A trial's current state and, once it has one, its outcome (result.json).

    ``best_val_acc``/``best_epoch``/``checkpoint`` name its best checkpoint on disk; ``epochs_done`` the
    epochs trained so far; ``worker`` the worker that last ran it; ``reason`` why it is in this state.
    """

    trial_id: str
    state: TrialState
    reason: str = ""
    worker: str = ""
    best_val_acc: float = 0.0
    best_epoch: int = 0
    epochs_done: int = 0
    seconds: float = 0.0
    finished_at: float | None = None
    checkpoint: str | None = None
    sanity: list[dict[str, Any]] | None = None
    updated_at: float | None = None

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["state"] = self.state.value
        return {k: v for k, v in out.items() if v is not None or k in ("finished_at", "checkpoint")}

    @classmethod
    def from_dict(cls, doc: Any) -> TrialResult:
        return _from_dict(cls, doc, {
            "trial_id": _typed(str), "state": _enum(TrialState), "reason": _typed(str), "worker": _typed(str),
            "best_val_acc": _number, "best_epoch": _count, "epochs_done": _count, "seconds": _number,
            "finished_at": _typed((int, float), optional=True), "checkpoint": _typed(str, optional=True),
            "sanity": _typed(list, optional=True), "updated_at": _typed((int, float), optional=True),
        })


@dataclass(frozen=True)
class StageRecord:
    """What was launched for one stage and how it stands (stages/<stage>.json)."""

    stage: str
    method: str
    epochs: int
    seed: int
    trial_ids: tuple[str, ...]
    status: StageStatus
    ranges: dict[str, dict[str, Any]] = field(default_factory=dict)  # parameter -> distribution table sampled
    from_stage: str | None = None
    note: str = ""
    created_at: str = ""
    updated_at: str = ""
    summary: str = ""
    flags: tuple[dict[str, Any], ...] | None = None  # border flags, recorded once the stage completed
    flag_messages: tuple[str, ...] = ()

    @property
    def closed(self) -> bool:
        """Completed, with its border flags recorded."""
        return self.status is StageStatus.COMPLETED and self.flags is not None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(status=self.status.value, trial_ids=list(self.trial_ids), flag_messages=list(self.flag_messages))
        if self.flags is None:
            del out["flags"]
        else:
            out["flags"] = list(self.flags)
        return out

    @classmethod
    def from_dict(cls, doc: Any) -> StageRecord:
        def strings(value: Any, where: str) -> tuple[str, ...]:
            _check(value, list, where)
            return tuple(_check(v, str, f"{where}[{i}]") for i, v in enumerate(value))

        return _from_dict(cls, doc, {
            "stage": _typed(str), "method": _typed(str), "epochs": _count, "seed": _count,
            "trial_ids": strings, "status": _enum(StageStatus), "ranges": _typed(dict),
            "from_stage": _typed(str, optional=True), "note": _typed(str), "created_at": _typed(str),
            "updated_at": _typed(str), "summary": _typed(str), "flags": _tables, "flag_messages": strings,
        })


@dataclass(frozen=True)
class ExperimentRecord:
    """The experiment as first launched (experiment.json): its config, the TOML it came from, seed, code, and for a
    launch sized from a budget, the budget and each plan (stage dicts with their name; re-sized after each stage)."""

    name: str
    config: dict[str, Any]
    config_text: str
    seed: int
    created_at: str
    code_version: str = ""
    budget: dict[str, Any] | None = None
    plans: tuple[dict[str, Any], ...] = ()
    id: str = ""  # random, drawn at first launch: jobs carry it, so a worker tells another storage's experiment apart

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.budget is None:  # a launch without a budget writes what it always wrote
            del out["budget"], out["plans"]
        else:
            out["plans"] = list(self.plans)
        return out

    @classmethod
    def from_dict(cls, doc: Any) -> ExperimentRecord:
        return _from_dict(cls, doc, {"name": _typed(str), "config": _typed(dict), "config_text": _typed(str),
                                     "seed": _count, "created_at": _typed(str), "code_version": _typed(str),
                                     "budget": _typed(dict, optional=True), "plans": _tables, "id": _typed(str)})
