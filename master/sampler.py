"""Seeded random sampling of an experiment's search space into TrialSpecs."""
from __future__ import annotations

import zlib
from typing import Any, Sequence

import numpy as np

from master.config import ConfigError, Distribution, ExperimentConfig
from nncore.model import MODEL_DEFAULTS
from nncore.relevance import unused_fields
from nncore.solver import SOLVER_DEFAULTS
from worker.spec import SpecError, TrialSpec, trial_id

SEED_BOUND = 2**31  # training seeds are drawn from [0, SEED_BOUND)


def trial_rng(seed: int, stage: str, index: int) -> np.random.Generator:
    """The generator of trial ``index`` of ``stage``: its training seed first, then its values in space order."""
    return np.random.default_rng([seed, zlib.crc32(stage.encode()), index])


def sample_trials(config: ExperimentConfig, stage: str, n: int, seed: int | None = None,
                  start_index: int = 0) -> list[TrialSpec]:
    """Trials ``start_index .. start_index + n - 1`` of ``stage``, sampled at random from ``config.space``.

    Trial i depends only on (seed, stage, i) (``seed`` defaults to the experiment's), so the same config and
    seed give the same trials and asking for more keeps the first ones. A narrowed stage samples a config
    whose space was replaced (``dataclasses.replace(config, space=...)``).
    """
    for name, value in (("n", n), ("start_index", start_index)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name}: expected an integer >= 0, got {value!r}")
    seed = config.seed if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed: expected an integer >= 0, got {seed!r}")
    config.stage(stage)
    specs = []
    for index in range(start_index, start_index + n):
        rng = trial_rng(seed, stage, index)
        train_seed = int(rng.integers(SEED_BOUND))
        params, _ = applicable(config, {dist.name: dist.sample(rng) for dist in config.space})
        try:
            specs.append(config.trial_spec(stage, index, train_seed, params))
        except SpecError as exc:
            raise ConfigError(f"{trial_id(stage, index)}: sampled values {params} are rejected: {exc}") from None
    return specs


def applicable(config: ExperimentConfig, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The sampled ``params`` that apply to a trial, and {name: why not} for the others.

    A parameter with ``when`` applies where its condition holds; one without applies unless nncore says the
    trial's update rule, schedule, arch, activation or init does not read it. Conditions see the trial's
    fields (sampled values that apply, else the fixed ones, else nncore's defaults); dropping a parameter
    can make another one inapplicable, so this repeats until nothing changes. Every value is drawn first,
    so the random stream, and the values of the parameters that apply, do not depend on the conditions.
    """
    kept, skipped = dict(params), {}
    changed = True
    while changed:
        changed = False
        sections = {"model": {**MODEL_DEFAULTS, **config.model}, "solver": {**SOLVER_DEFAULTS, **config.solver}}
        for dotted, value in kept.items():
            section, _, key = dotted.partition(".")
            sections[section][key] = value
        unused = unused_fields(sections["model"], sections["solver"])

        def value_of(dotted: str) -> Any:
            section, _, key = dotted.partition(".")
            return sections[section].get(key)

        for dist in config.space:
            if dist.name in kept:
                why = dist.applies(value_of) if dist.when else unused.get(dist.name)
                if why is not None:
                    del kept[dist.name]
                    skipped[dist.name] = why
                    changed = True
                    break
    return kept, skipped


def left_out(space: Sequence[Distribution], specs: Sequence[TrialSpec]) -> dict[str, int]:
    """{parameter: how many of ``specs`` did not sample it} for the parameters of ``space`` some trial left out."""
    counts = {dist.name: sum(dist.name not in spec.params for spec in specs) for dist in space}
    return {name: n for name, n in counts.items() if n}
