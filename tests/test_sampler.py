"""Tests for seeded random sampling: distribution statistics, determinism, prefix stability, the examples."""
import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest

from master.sampler import sample_trials, trial_rng
from master.config import ConfigError, Distribution, load_config, parse_config
from nncore.data import load_dataset
from nncore.model import build_model
from worker.spec import TrialSpec

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.toml"))
N = 20000


def draws(dist, n=N, seed=0):
    rng = np.random.default_rng(seed)
    return [dist.sample(rng) for _ in range(n)]


def ks_uniform(u):
    """Kolmogorov-Smirnov distance between the sample ``u`` and U(0, 1)."""
    u = np.sort(np.asarray(u))
    i = np.arange(1, len(u) + 1)
    return max(np.max(i / len(u) - u), np.max(u - (i - 1) / len(u)))


def assert_frequencies(samples, probs):
    """Each value's frequency lies within 4 standard errors of its probability, and no other value occurs."""
    assert set(samples) == set(probs)
    for value, p in probs.items():
        freq = samples.count(value) / len(samples)
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / len(samples)), (value, freq, p)


def test_loguniform_is_uniform_in_log10():
    x = np.array(draws(Distribution("solver.lr", "loguniform", 1e-4, 1e-1)))
    assert x.min() >= 1e-4 and x.max() <= 1e-1
    logs = np.log10(x)
    assert abs(logs.mean() - (-2.5)) < 4 * (3 / math.sqrt(12)) / math.sqrt(N)   # closed form: (a + b) / 2
    assert logs.std() == pytest.approx(3 / math.sqrt(12), rel=0.02)             # (b - a) / sqrt(12)
    assert ks_uniform((logs + 4) / 3) < 1.63 / math.sqrt(N)                     # KS at the 1% level
    assert np.mean(x < 1e-3) == pytest.approx(1 / 3, abs=0.02)                  # one decade of three


def test_uniform_is_uniform():
    x = np.array(draws(Distribution("model.dropout", "uniform", 0.1, 0.5)))
    assert x.min() >= 0.1 and x.max() <= 0.5
    assert ks_uniform((x - 0.1) / 0.4) < 1.63 / math.sqrt(N)
    assert ks_uniform(np.log10(x / 0.1) / math.log10(5)) > 0.05   # the KS check does tell the scales apart


def test_int_includes_both_bounds():
    samples = draws(Distribution("model.conv_kernel", "int", 1, 3), n=6000)
    assert all(type(v) is int for v in samples)
    assert_frequencies(samples, {1: 1 / 3, 2: 1 / 3, 3: 1 / 3})


def test_logint_is_log_uniform_over_integers():
    samples = draws(Distribution("solver.batch_size", "logint", 1, 8))
    assert all(type(v) is int for v in samples)
    assert_frequencies(samples, {k: math.log((k + 1) / k) / math.log(9) for k in range(1, 9)})
    wide = draws(Distribution("solver.batch_size", "logint", 16, 256), n=2000)
    assert min(wide) >= 16 and max(wide) <= 256


def test_choice_frequencies_and_copies():
    dist = Distribution("model.hidden", "choice", values=([64], [128], [256, 128]))
    samples = draws(dist, n=6000)
    assert_frequencies([tuple(v) for v in samples], {(64,): 1 / 3, (128,): 1 / 3, (256, 128): 1 / 3})
    samples[0].append(1)                           # a sample is a copy: the choices are untouched
    assert dist.values == ([64], [128], [256, 128])


@pytest.fixture(scope="module")
def config():
    return load_config(None)


def test_same_config_and_seed_give_the_same_trials(config):
    first = sample_trials(config, "coarse", 6)
    assert first == sample_trials(config, "coarse", 6)
    assert first == sample_trials(config, "coarse", 6, seed=config.seed)
    assert [t.params for t in first] != [t.params for t in sample_trials(config, "coarse", 6, seed=1)]
    assert [t.params for t in first] != [t.params for t in sample_trials(config, "medium", 6)]


def test_asking_for_more_trials_keeps_the_first_ones(config):
    many = sample_trials(config, "coarse", 12)
    assert sample_trials(config, "coarse", 5) == many[:5]
    assert sample_trials(config, "coarse", 7, start_index=5) == many[5:]
    assert [t.trial_id for t in many[:3]] == ["coarse-0000", "coarse-0001", "coarse-0002"]
    assert len({t.seed for t in many}) == len(many)
    assert sample_trials(config, "coarse", 0) == []


def test_trial_i_uses_the_documented_generator(config):
    spec = sample_trials(config, "medium", 1, seed=5, start_index=3)[0]
    rng = np.random.default_rng([5, zlib.crc32(b"medium"), 3])
    assert spec.seed == int(rng.integers(2**31))
    assert list(spec.params.values()) == [d.sample(rng) for d in config.space]
    assert trial_rng(5, "medium", 3).random() == np.random.default_rng([5, zlib.crc32(b"medium"), 3]).random()


def test_trials_carry_the_sampled_values_over_the_fixed_ones(config):
    for spec in sample_trials(config, "fine", 8):
        assert spec.stage == "fine" and spec.epochs == 30 and spec.solver["epochs"] == 30
        assert spec.experiment == config.name and spec.dataset == config.dataset
        assert spec.solver["lr"] == spec.params["solver.lr"] and spec.solver["update"] == "adam"
        assert spec.model["hidden"] == spec.params["model.hidden"]
        assert spec.keep == config.keep and spec.sanity == config.sanity and spec.parent is None


def test_sampled_values_are_json_safe_python_types(config):
    for spec in sample_trials(config, "coarse", 10):
        for name, value in spec.params.items():
            assert type(value) in (float, int, str, bool, list), (name, value)
        assert TrialSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_sampling_errors_are_space_errors(config):
    with pytest.raises(ConfigError, match=r"^stage 'nope': not in experiment digits-mlp"):
        sample_trials(config, "nope", 3)
    with pytest.raises(ConfigError, match=r"^n: expected an integer >= 0, got -1"):
        sample_trials(config, "coarse", -1)
    with pytest.raises(ConfigError, match=r"^seed: expected an integer >= 0, got -2"):
        sample_trials(config, "coarse", 1, seed=-2)
    with pytest.raises(ConfigError, match=r"^start_index: expected an integer >= 0"):
        sample_trials(config, "coarse", 1, start_index=1.5)


def test_a_combination_nncore_refuses_names_the_trial():
    # each value passes on its own at load time; together they exceed nncore's parameter limit
    cfg = parse_config('[experiment]\nname = "t"\n[model]\nmaxout_pieces = 4\n[space.model]\n'
                       'hidden = { dist = "choice", values = [[4096, 4096]] }\n'
                       'activation = { dist = "choice", values = ["maxout"] }\n')
    with pytest.raises(ConfigError, match=r"^coarse-0000: sampled values .* are rejected: model.hidden: "):
        sample_trials(cfg, "coarse", 1)


def test_the_shipped_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"digits_mlp.toml", "spiral.toml", "conv1d_waves.toml",
                                          "npz_template.toml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_loads_samples_and_builds(path):
    cfg = load_config(path)
    specs = sample_trials(cfg, cfg.stages[0].name, 4)
    assert [t.trial_id for t in specs] == [f"{cfg.stages[0].name}-{i:04d}" for i in range(4)]
    if ":" in cfg.dataset:
        return                                     # a template's path does not exist here
    data = load_dataset(cfg.dataset)
    for spec in specs:
        model = build_model(spec.model, data.input_shape, data.num_classes, seed=spec.seed)
        assert model.scores(data.x_val[:2]).shape == (2, data.num_classes)
