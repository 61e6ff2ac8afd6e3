"""Tests for parsing and validating experiment configs: settings, stages, distributions and their errors."""
import dataclasses
import json
from importlib import resources

import pytest

from master.config import (
    DEFAULT_STAGES,
    Distribution,
    ExperimentConfig,
    ConfigError,
    StageConfig,
    config_from_dict,
    load_config,
    parse_config,
)

BASE = '[experiment]\nname = "t"\ndataset = "digits"\n'
STAGES = "[stages.a]\nepochs = 1\ntrials = 4\n"

FULL = '''
[experiment]
name = "digits-mlp"
dataset = "digits"
seed = 3
keep = 2
sanity = true
[data]
preprocess = "standardize"
[model]
hidden = [32]
[solver]
update = "adam"
lr = 0.5
[stages.coarse]
epochs = 1
trials = 32
[stages.medium]
epochs = 5
trials = 16
top = 8
[stages.fine]
epochs = 30
trials = 4
method = "promote"
[space.solver]
lr  = { dist = "loguniform", low = 1e-4, high = 1e-1 }
batch_size = { dist = "logint", low = 16, high = 256 }
[space.model]
dropout = { dist = "uniform", low = 0.0, high = 0.5 }
hidden  = { dist = "choice", values = [[64], [128], [256, 128]] }
conv_kernel = { dist = "int", low = 3, high = 7 }
'''


def parse(text: str) -> ExperimentConfig:
    return parse_config(text, "search.toml")


def test_full_config_is_parsed_in_order_with_resolved_stage_defaults():
    cfg = parse(FULL)
    assert (cfg.name, cfg.dataset, cfg.seed, cfg.keep, cfg.sanity) == ("digits-mlp", "digits", 3, 2, True)
    assert cfg.data == {"preprocess": "standardize"} and cfg.solver == {"update": "adam", "lr": 0.5}
    assert cfg.stages == (
        StageConfig("coarse", 1, 32),
        StageConfig("medium", 5, 16, method="narrow", top=8),       # later stages narrow by default
        StageConfig("fine", 30, 4, method="promote", top=4),        # promote: top == trials
    )
    assert [d.name for d in cfg.space] == ["solver.lr", "solver.batch_size", "model.dropout", "model.hidden",
                                           "model.conv_kernel"]
    assert [d.log for d in cfg.space] == [True, True, False, False, False]
    assert cfg.space[3].values == ([64], [128], [256, 128])


def test_default_config_is_package_data_and_loads():
    assert resources.files("master").joinpath("default.toml").is_file()
    cfg = load_config(None)
    assert cfg.name == "digits-mlp" and cfg.dataset == "digits"
    assert cfg.stages == DEFAULT_STAGES
    assert [s.method for s in cfg.stages] == ["random", "promote", "promote", "promote"]
    assert {"solver.lr", "solver.reg", "model.dropout", "model.hidden"} <= {d.name for d in cfg.space}


def test_stage_defaults():
    assert StageConfig("m", 5, 16, "narrow").quantile == 0.2
    assert StageConfig("f", 9, 3, "promote").top == 3
    cfg = parse(BASE + STAGES + "[stages.b]\nepochs = 3\ntop = 2\nmethod = 'promote'\n")
    assert cfg.stages[1] == StageConfig("b", 3, 2, "promote", top=2)   # promote: trials default to top
    assert parse(BASE + "[stages]\n").stages == DEFAULT_STAGES


def test_to_dict_round_trips_through_json():
    for cfg in (parse(FULL), load_config(None)):
        doc = json.loads(json.dumps(cfg.to_dict()))
        assert config_from_dict(doc) == cfg


def test_a_field_both_fixed_and_sampled_is_allowed():
    cfg = parse(FULL)
    assert cfg.solver["lr"] == 0.5 and "solver.lr" in {d.name for d in cfg.space}


def test_replace_revalidates():
    cfg = parse(FULL)
    with pytest.raises(ConfigError, match="^space.solver.lr: low must be below high"):
        dataclasses.replace(cfg.space[0], low=1.0)
    narrowed = dataclasses.replace(cfg.space[0], low=1e-3, high=1e-2)
    assert dataclasses.replace(cfg, space=(narrowed,)).space == (narrowed,)
    with pytest.raises(ConfigError, match="^stages.x.epochs"):
        dataclasses.replace(cfg.stages[0], name="x", epochs=0)


@pytest.mark.parametrize("dist, value, unit", [
    (Distribution("solver.lr", "loguniform", 1e-4, 1e-2), 1e-3, 0.5),
    (Distribution("model.dropout", "uniform", 0.0, 0.5), 0.125, 0.25),
    (Distribution("model.conv_kernel", "int", 3, 7), 7, 1.0),
    (Distribution("solver.batch_size", "logint", 16, 256), 64, 0.5),
    (Distribution("model.hidden", "choice", values=([64], [128], [256])), [128], 0.5),
])
def test_unit_mapping_is_in_the_sampled_scale_and_round_trips(dist, value, unit):
    assert dist.to_unit(value) == pytest.approx(unit)
    assert dist.from_unit(unit) == pytest.approx(value)
    assert type(dist.from_unit(unit)) is type(value)
    assert dist.from_unit(0.0) == (dist.values[0] if dist.dist == "choice" else dist.low)


def test_to_unit_of_an_unlisted_choice_is_an_error():
    with pytest.raises(ConfigError, match=r"^space.model.hidden: \[7\] is not one of the choices"):
        Distribution("model.hidden", "choice", values=([64],)).to_unit([7])


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml: cannot read config"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[experiment]\nname = '\xff'\n")
    with pytest.raises(ConfigError, match="bad.toml: not UTF-8"):
        load_config(bad)
    bad.write_text('[experiment]\nname = "x"\ndataset = \n')
    with pytest.raises(ConfigError, match=r"bad.toml: invalid TOML at line 3: Invalid value \(column \d+\)$"):
        load_config(bad)


@pytest.mark.parametrize("text, message", [
    # TOML syntax
    ('[experiment]\nname = "x"\n[experiment]\n', r"^search.toml: invalid TOML at line 3: "),
    ('[experiment]\nname = "x', r"^search.toml: invalid TOML at line 2: Unterminated string \(at end of file\)"),
    # sections and [experiment]
    ("[model]\n", r"^experiment: missing table \[experiment\]"),
    ("experiment = 3\n", r"^experiment: expected a table, got 3"),
    ('[experiment]\ndataset = "digits"\n', r"^experiment.name: missing"),
    ('[experiment]\nname = "../x"\n', r"^experiment.name: '../x' is not a valid name"),
    (BASE + "nmae = 1\n", r"^experiment.nmae: unknown key \(did you mean 'name'\?\) "
                          r"\(known: name, dataset, seed, keep, sanity\)"),
    (BASE + "[search]\n", r"^search: unknown section \(known: experiment, data"),
    (BASE.replace('"digits"', '"imagenet"'), r"^experiment.dataset: 'imagenet' is not a dataset name \(known: "),
    (BASE.replace('"digits"', '"digitz"'), r"^experiment.dataset: 'digitz' is not a dataset name "
                                           r"\(did you mean 'digits'\?\) \(known: "),
    (BASE.replace('"digits"', '"npz:"'), r"^experiment.dataset: 'npz:' is not a dataset name"),
    (BASE.replace('"digits"', '"digits:3"'), r"^experiment.dataset: 'digits:3' is not a dataset name"),
    (BASE.replace('"digits"', "7"), r"^experiment.dataset: 7 is not a dataset name"),
    (BASE + "seed = -1\n", r"^experiment.seed: expected an integer >= 0, got -1"),
    (BASE + "keep = 0\n", r"^experiment.keep: expected an integer >= 1, got 0"),
    (BASE + 'sanity = "yes"\n', r"^experiment.sanity: expected true or false"),
    # fixed fields, validated by nncore through a TrialSpec
    (BASE + "[model]\nhiden = [3]\n", r"^model.hiden: unknown field"),
    (BASE + '[solver]\nlr = "fast"\n', r"^solver.lr: "),
    (BASE + "[solver]\nepochs = 3\n", r"^solver.epochs: set per stage"),
    (BASE + '[data]\npreprocess = "whiten"\n', r"^data.preprocess: "),
    ("model = 3\n" + BASE, r"^model: expected a table, got 3"),
    # space: fields and sections
    (BASE + "[space.solver]\nlrr = { dist = 'uniform', low = 0, high = 1 }\n",
     r"^space.solver.lrr: unknown solver field \(did you mean 'lr'\?\) \(known: update, lr, "),
    (BASE + "[space.model]\nwidth = { dist = 'int', low = 1, high = 9 }\n", r"^space.model.width: unknown model field"),
    (BASE + "[space.optim]\nlr = { dist = 'uniform', low = 0, high = 1 }\n", r"^space.optim: unknown section"),
    (BASE + "[space.solver]\nepochs = { dist = 'int', low = 1, high = 9 }\n",
     r"^space.solver.epochs: epochs come from the stage"),
    (BASE + "[space]\nsolver = 3\n", r"^space.solver: expected a table, got 3"),
    (BASE + "[space.solver]\nlr = 0.01\n", r"^space.solver.lr: expected a table like \{ dist = "),
    # space: distributions
    (BASE + "[space.solver]\nlr = { dist = 'normal', low = 0, high = 1 }\n",
     r"^space.solver.lr.dist: unknown distribution 'normal' \(known: uniform, loguniform, int, logint, choice\)"),
    (BASE + "[space.solver]\nlr = { low = 0, high = 1 }\n", r"^space.solver.lr.dist: missing"),
    (BASE + "[space.solver]\nlr = { dist = 'uniform', low = 0, hgh = 1 }\n", r"^space.solver.lr.hgh: unknown key"),
    (BASE + "[space.solver]\nlr = { dist = 'uniform', low = 0.1 }\n", r"^space.solver.lr.high: missing"),
    (BASE + "[space.solver]\nlr = { dist = 'loguniform', low = 0.1, high = 0.01 }\n",
     r"^space.solver.lr: low must be below high, got low=0.1, high=0.01"),
    (BASE + "[space.model]\nconv_kernel = { dist = 'int', low = 3, high = 3 }\n",
     r"^space.model.conv_kernel: low must be below high"),
    (BASE + "[space.solver]\nlr = { dist = 'loguniform', low = 0.0, high = 0.1 }\n",
     r"^space.solver.lr.low: loguniform needs low > 0, got 0.0"),
    (BASE + "[space.solver]\nbatch_size = { dist = 'logint', low = -4, high = 64 }\n",
     r"^space.solver.batch_size.low: logint needs low > 0"),
    (BASE + "[space.solver]\nlr = { dist = 'uniform', low = 'a', high = 1 }\n",
     r"^space.solver.lr.low: expected a finite number, got 'a'"),
    (BASE + "[space.solver]\nlr = { dist = 'uniform', low = 0, high = inf }\n",
     r"^space.solver.lr.high: expected a finite number, got inf"),
    (BASE + "[space.solver]\nbatch_size = { dist = 'int', low = 16.0, high = 64 }\n",
     r"^space.solver.batch_size.low: int needs an integer, got 16.0"),
    (BASE + "[space.model]\nhidden = { dist = 'choice', values = [] }\n",
     r"^space.model.hidden.values: expected a non-empty list"),
    (BASE + "[space.model]\nhidden = { dist = 'choice', values = 64 }\n",
     r"^space.model.hidden.values: expected a non-empty list, got 64"),
    (BASE + "[space.model]\nhidden = { dist = 'choice', low = 1, values = [[8]] }\n",
     r"^space.model.hidden.low: not used by choice"),
    (BASE + "[space.model]\ndropout = { dist = 'uniform', low = 0, high = 0.5, values = [0.1] }\n",
     r"^space.model.dropout.values: only used by choice"),
    (BASE + "[space.model]\nactivation = { dist = 'choice', values = ['relu', 1979-05-27] }\n",
     r"^space.model.activation.values\[1\]: .* is not a JSON value"),
    # space: values nncore refuses, caught at load time
    (BASE + "[space.model]\ndropout = { dist = 'uniform', low = 0.0, high = 1.5 }\n",
     r"^space.model.dropout: 1.5 is rejected: model.dropout: "),
    (BASE + "[space.model]\nhidden = { dist = 'choice', values = [[64], [0]] }\n",
     r"^space.model.hidden: \[0\] is rejected: model.hidden: "),
    (BASE + "[space.solver]\nbatch_size = { dist = 'uniform', low = 16, high = 256 }\n",
     r"^space.solver.batch_size: 185\.\d+ is rejected: solver.batch_size: "),
    (BASE + "[space.solver]\nupdate = { dist = 'choice', values = ['sgd', 'lbfgs'] }\n",
     r"^space.solver.update: 'lbfgs' is rejected: solver.update: "),
    # stages
    (BASE + "[stages.a]\nepochs = 0\ntrials = 4\n", r"^stages.a.epochs: expected an integer >= 1, got 0"),
    (BASE + "[stages.a]\nepochs = 1\ntrials = true\n", r"^stages.a.trials: expected an integer >= 1, got True"),
    (BASE + "[stages.a]\nepochs = 1\n", r"^stages.a.trials: missing"),
    (BASE + "[stages.a]\ntrials = 1\n", r"^stages.a.epochs: missing"),
    (BASE + "[stages.a]\nepoch = 1\n", r"^stages.a.epoch: unknown key \(did you mean 'epochs'\?\) "
                                   r"\(known: epochs, trials, method"),
    (BASE + "[stages]\na = 3\n", r"^stages.a: expected a table, got 3"),
    (BASE + '[stages."a b"]\nepochs = 1\ntrials = 1\n', r"^stages: 'a b' is not a valid name"),
    (BASE + f"[stages.{'s' * 62}]\nepochs = 1\ntrials = 1\n", r"trial ids like 's+-0000' would exceed 64 characters"),
    (BASE + STAGES + "[stages.b]\nepochs = 2\ntrials = 2\nmethod = 'grid'\n",
     r"^stages.b.method: expected one of random, narrow, promote, got 'grid'"),
    (BASE + "[stages.a]\nepochs = 1\ntrials = 4\nmethod = 'narrow'\n",
     r"^stages.a.method: the first stage samples at random; narrow needs a previous stage"),
    (BASE + "[stages.a]\nepochs = 1\ntrials = 4\ntop = 2\n", r"^stages.a.top: only narrow and promote stages use it"),
    (BASE + STAGES + "[stages.b]\nepochs = 2\ntrials = 2\ntop = 2\nquantile = 0.5\n",
     r"^stages.b: give top or quantile, not both"),
    (BASE + STAGES + "[stages.b]\nepochs = 2\ntrials = 2\nquantile = 0\n",
     r"^stages.b.quantile: expected a fraction in \(0, 1\], got 0"),
    (BASE + STAGES + "[stages.b]\nepochs = 2\ntrials = 2\npad = 1.0\n", r"^stages.b.pad: expected a fraction in \[0, 1\)"),
    (BASE + STAGES + "[stages.b]\nepochs = 2\ntrials = 2\ntop = 9\n", r"^stages.b.top: 9 exceeds the 4 trials of stage a"),
    (BASE + STAGES + "[stages.b]\nepochs = 1\ntrials = 3\nmethod = 'narrow'\n"
     "[stages.c]\nepochs = 2\ntrials = 8\nmethod = 'promote'\npool = 'all'\n",
     r"^stages.c.top: 8 exceeds the 7 trials of stages a, b"),
    (BASE + STAGES + "[stages.b]\nepochs = 2\ntrials = 3\ntop = 2\nmethod = 'promote'\n",
     r"^stages.b.top: a promote stage continues its top trials, so trials must equal top \(got trials=3, top=2\)"),
    (BASE + STAGES + "[stages.b]\nepochs = 2\ntrials = 3\nquantile = 1.5\nmethod = 'promote'\n",
     r"^stages.b.quantile: expected a fraction in \(0, 1\], got 1.5"),
    (BASE + STAGES + "[stages.b]\nepochs = 1\ntrials = 2\nmethod = 'promote'\n",
     r"^stages.b.epochs: a promote stage continues stage a \(epochs = 1\), so it needs more epochs, got 1"),
])
def test_every_validation_error_names_its_key(text, message):
    with pytest.raises(ConfigError, match=message):
        parse(text)


def test_direct_construction_is_validated():
    with pytest.raises(ConfigError, match="^stages: expected at least one stage"):
        ExperimentConfig("t", stages=())
    with pytest.raises(ConfigError, match="^stages.coarse: defined twice"):
        ExperimentConfig("t", stages=(StageConfig("coarse", 1, 2), StageConfig("coarse", 2, 2)))
    lr = Distribution("solver.lr", "loguniform", 1e-3, 1e-1)
    with pytest.raises(ConfigError, match="^space.solver.lr: sampled twice"):
        ExperimentConfig("t", space=(lr, lr))
    with pytest.raises(ConfigError, match="^space: expected Distribution objects"):
        ExperimentConfig("t", space=({"dist": "uniform"},))
    with pytest.raises(ConfigError, match=r"^stage 'nope': not in experiment t \(stages: coarse, short, medium, fine\)"):
        ExperimentConfig("t").stage("nope")


def test_a_misspelt_stage_name_gets_a_suggestion():
    config = config_from_dict({"experiment": {"name": "t"}})
    with pytest.raises(ConfigError, match=r"^stage 'medim': not in experiment t \(did you mean 'medium'\?\)"):
        config.stage("medim")


def test_a_promote_stage_with_pool_all_may_take_more_than_the_previous_stage_has():
    config = parse(BASE + STAGES + "[stages.b]\nepochs = 1\ntrials = 3\nmethod = 'narrow'\n"
                   "[stages.c]\nepochs = 2\ntrials = 7\nmethod = 'promote'\npool = 'all'\nquantile = 0.5\n")
    assert (config.stage("c").top, config.stage("c").quantile) == (7, 0.5)

