"""Seeded random sampling of an experiment's search space into TrialSpecs."""
from __future__ import annotations

import zlib

import numpy as np

from master.config import ConfigError, ExperimentConfig
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
        params = {dist.name: dist.sample(rng) for dist in config.space}
        try:
            specs.append(config.trial_spec(stage, index, train_seed, params))
        except SpecError as exc:
            raise ConfigError(f"{trial_id(stage, index)}: sampled values {params} are rejected: {exc}") from None
    return specs
