"""The trial specification a worker receives: frozen, JSON-safe, validated on construction."""
from __future__ import annotations

import math
import re
from dataclasses import MISSING, asdict, dataclass, field
from typing import Any

from nncore.data import validate_data_options
from nncore.errors import ConfigError, DataError
from nncore.model import validate_model_config
from nncore.solver import validate_solver_config

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SpecError(ValueError):
    """A trial specification is invalid; the message names the field."""


def check_name(value: Any, what: str) -> str:
    """Return ``value`` if it is a safe single path component (no traversal), else raise SpecError."""
    if not isinstance(value, str) or not NAME_RE.match(value) or value in (".", ".."):
        raise SpecError(
            f"{what}: {value!r} is not a valid name (letters, digits, '_', '.', '-'; "
            "must start with a letter or digit; at most 64 characters)"
        )
    return value


def trial_id(stage: str, index: int) -> str:
    """Readable trial id, e.g. ``coarse-0042``."""
    return f"{stage}-{index:04d}"


@dataclass(frozen=True)
class TrialSpec:
    """Everything a worker needs to run one trial; JSON-safe and validated on construction."""

    experiment: str
    trial_id: str
    stage: str
    dataset: str
    model: dict[str, Any]
    solver: dict[str, Any]
    epochs: int
    seed: int
    params: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    sanity: bool = False
    keep: int = 3
    parent: str | None = None

    def __post_init__(self) -> None:
        check_name(self.experiment, "experiment")
        check_name(self.trial_id, "trial_id")
        check_name(self.stage, "stage")
        if self.parent is not None:
            check_name(self.parent, "parent")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise SpecError(f"dataset: expected a non-empty string, got {self.dataset!r}")
        for name, low in (("epochs", 1), ("keep", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SpecError(f"{name}: expected an integer >= {low}, got {value!r}")
        if not isinstance(self.sanity, bool):
            raise SpecError(f"sanity: expected true or false, got {self.sanity!r}")
        if not isinstance(self.params, dict) or not all(isinstance(k, str) for k in self.params):
            raise SpecError("params: expected a table of dotted names to values")
        for key, value in self.params.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise SpecError(f"params.{key}: non-finite value {value!r}")
        try:
            model = validate_model_config(self.model)
            solver = validate_solver_config({**self.solver, "epochs": self.epochs})
            data = validate_data_options(self.data)
        except (ConfigError, DataError) as exc:
            raise SpecError(str(exc)) from None
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "solver", solver)
        object.__setattr__(self, "data", data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialSpec:
        if not isinstance(d, dict):
            raise SpecError(f"spec: expected a JSON object, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise SpecError(f"{unknown[0]}: unknown spec field")
        missing = sorted(k for k, f in cls.__dataclass_fields__.items()
                         if k not in d and f.default is MISSING and f.default_factory is MISSING)
        if missing:
            raise SpecError(f"{missing[0]}: missing spec field")
        return cls(**d)

