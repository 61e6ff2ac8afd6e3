"""Conditional parameters: `when` in the space, nncore's own relevance rule, and what narrowing and flags see."""
import dataclasses

import pytest

from master.borders import analyse, top_trials
from master.config import ConfigError, Distribution, config_from_dict, parse_config
from master.launcher import plan_lines
from master.sampler import SEED_BOUND, applicable, sample_trials, trial_rng
from master.stages import StagePlan
from nncore.relevance import unused_fields

SPIRAL_SPACE = {  # the spiral example's space, without any `when`: nncore's rule alone decides what applies
    "solver": {"lr": {"dist": "loguniform", "low": 1e-3, "high": 1.0},
               "update": {"dist": "choice", "values": ["sgd", "momentum", "nesterov", "rmsprop", "adam"]},
               "momentum": {"dist": "uniform", "low": 0.5, "high": 0.99},
               "decay_rate": {"dist": "uniform", "low": 0.9, "high": 0.999}},
    "model": {"activation": {"dist": "choice", "values": ["relu", "tanh", "elu"]},
              "init": {"dist": "choice", "values": ["he", "xavier", "small"]},
              "init_scale": {"dist": "loguniform", "low": 1e-3, "high": 1e-1}},
}


def spiral(space=SPIRAL_SPACE, trials=48):
    return config_from_dict({"experiment": {"name": "spiral", "dataset": "spiral", "seed": 1},
                             "stages": {"coarse": {"epochs": 1, "trials": trials}}, "space": space})


def test_nncore_knows_which_fields_each_choice_reads():
    unused = unused_fields({"init": "he", "activation": "elu"}, {"update": "adam"})
    assert {"solver.momentum", "solver.decay_rate", "model.init_scale", "model.leaky_alpha"} <= set(unused)
    assert not {"solver.lr", "solver.beta1", "solver.eps", "model.elu_alpha"} & set(unused)
    assert "update = 'adam'" in unused["solver.momentum"]
    assert "solver.momentum" not in unused_fields({}, {"update": "nesterov"})


def test_a_conditional_parameter_is_sampled_only_where_its_condition_holds():
    config = parse_config('''
[experiment]
name = "cond"
[stages.coarse]
epochs = 1
trials = 40
[space.solver]
update = { dist = "choice", values = ["sgd", "momentum", "adam"] }
momentum = { dist = "uniform", low = 0.5, high = 0.99, when = { "solver.update" = ["momentum"] } }
beta1 = { dist = "uniform", low = 0.8, high = 0.99, when = { "solver.update" = "adam" } }
''')
    specs = sample_trials(config, "coarse", 40)
    updates = {s.params["solver.update"] for s in specs}
    assert updates == {"sgd", "momentum", "adam"}
    for spec in specs:
        assert ("solver.momentum" in spec.params) == (spec.params["solver.update"] == "momentum")
        assert ("solver.beta1" in spec.params) == (spec.params["solver.update"] == "adam")
        assert spec.solver.get("momentum") == spec.params.get("solver.momentum", spec.solver.get("momentum"))
    # seeded: the same trials again, and each kept value is the one drawn without any condition
    assert sample_trials(config, "coarse", 40) == specs
    plain = dataclasses.replace(config, space=tuple(dataclasses.replace(d, when=()) for d in config.space))
    for spec, unconditioned in zip(specs, sample_trials(plain, "coarse", 40)):
        assert spec.seed == unconditioned.seed
        assert all(unconditioned.params[k] == v for k, v in spec.params.items())
    # round trip through the config's TOML shape keeps the condition
    assert config_from_dict(config.to_dict()) == config
    # the plan says what was left out
    plan = StagePlan(config.stages[0], tuple(specs), config.space)
    skipped = [line for line in plan_lines(plan) if "not sampled" in line]
    assert len(skipped) == 2 and any(line.strip().startswith("solver.momentum: not sampled for") for line in skipped)


def test_conditions_chain_and_see_fixed_fields():
    config = config_from_dict({
        "experiment": {"name": "chain"}, "solver": {"update": "adam"},
        "stages": {"coarse": {"epochs": 1, "trials": 4}},
        "space": {"solver": {"momentum": {"dist": "uniform", "low": 0.5, "high": 0.9,
                                          "when": {"solver.update": ["momentum"]}},
                             "beta2": {"dist": "uniform", "low": 0.9, "high": 0.999}}}})
    kept, skipped = applicable(config, {"solver.momentum": 0.7, "solver.beta2": 0.95})
    assert kept == {"solver.beta2": 0.95}
    assert skipped == {"solver.momentum": 'solver.update = "adam" is not one of ["momentum"]'}


@pytest.mark.parametrize("when, message", [
    ({"solver.updte": ["adam"]}, "did you mean 'solver.update'?"),
    ({"solver.update": ["nesterv"]}, "did you mean 'nesterov'?"),
    ({"solver.momentum": [0.9]}, "cannot depend on itself"),
    ({"solver.update": []}, "non-empty list"),
    ("adam", "expected a table"),
])
def test_bad_conditions_are_one_clear_line(when, message):
    space = {"solver": {"update": {"dist": "choice", "values": ["momentum", "nesterov"]},
                        "momentum": {"dist": "uniform", "low": 0.5, "high": 0.9, "when": when}}}
    with pytest.raises(ConfigError) as err:
        spiral(space)
    assert message in str(err.value) and "space.solver.momentum.when" in str(err.value)
    assert "\n" not in str(err.value)


def _scored(specs, raw):
    """Synthetic scores: he/xavier inits beat small and adam beats the rest; within a group, a larger init_scale
    and momentum score a little better (so a rule that sampled them everywhere would flag their upper border)."""
    out = []
    for spec, params in zip(specs, raw):
        p = spec.params
        score = 0.5 + 0.3 * (p["model.init"] != "small") + 0.1 * (p["solver.update"] == "adam")
        score += 0.02 * params["model.init_scale"] / 0.1 + 0.02 * params["solver.momentum"]
        out.append(score)
    return out


def test_nncore_rule_stops_flagging_parameters_the_best_trials_never_read():
    config = spiral()
    specs = sample_trials(config, "coarse", 48)
    for spec in specs:
        assert ("model.init_scale" in spec.params) == (spec.params["model.init"] == "small")
        assert ("solver.momentum" in spec.params) == (spec.params["solver.update"] in ("momentum", "nesterov"))
        assert ("solver.decay_rate" in spec.params) == (spec.params["solver.update"] == "rmsprop")
    raw = []
    for i in range(48):  # every value drawn, as sampling did before conditions existed
        rng = trial_rng(config.seed, "coarse", i)
        rng.integers(SEED_BOUND)
        raw.append({d.name: d.sample(rng) for d in config.space})
    scores = _scored(specs, raw)
    valid = lambda name, value: True  # noqa: E731
    everyone = [(s.params, v) for s, v in zip(specs, scores)]
    _, flags = analyse(top_trials(everyone, quantile=0.2), everyone, config.space, 0.1, valid)
    assert not {f.name for f in flags} & {"model.init_scale", "solver.momentum", "solver.decay_rate"}
    # control: with every value sampled for every trial, the same scores flag them
    everyone_raw = [(p, v) for p, v in zip(raw, scores)]
    _, raw_flags = analyse(top_trials(everyone_raw, quantile=0.2), everyone_raw, config.space, 0.1, valid)
    assert {f.name for f in raw_flags} & {"model.init_scale", "solver.momentum"}


def test_narrowing_keeps_the_condition():
    dist = Distribution("solver.momentum", "uniform", 0.5, 0.99, when={"solver.update": ["momentum"]})
    (new,), _ = analyse([({"solver.momentum": 0.9}, 1.0)] * 4, [({"solver.momentum": 0.6}, 0.1)] * 8 +
                        [({"solver.momentum": 0.9}, 1.0)] * 4, [dist], 0.1, lambda n, v: True)
    assert new.when == (("solver.update", ("momentum",)),)
