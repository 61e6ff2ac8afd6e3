"""Tests for TrialSpec validation, JSON round trips and the trial-state enum."""
import json

import pytest

from worker.spec import SpecError, TrialSpec, trial_id
from worker.states import TERMINAL_STATES, TrialState


def make(**over):
    base = dict(experiment="exp", trial_id="coarse-0001", stage="coarse", dataset="digits",
                model={"hidden": [32]}, solver={"lr": 0.01}, epochs=2, seed=7,
                params={"solver.lr": 0.01})
    base.update(over)
    return TrialSpec(**base)


def test_round_trip_through_json_is_exact():
    spec = make()
    again = TrialSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert spec.solver["epochs"] == 2          # the stage budget is the solver's epoch count
    assert spec.model["hidden"] == [32]
    assert spec.data["preprocess"] == "mean"   # defaults are filled in


@pytest.mark.parametrize("over, field", [
    (dict(experiment="../../etc"), "experiment"),
    (dict(trial_id="a/b"), "trial_id"),
    (dict(stage=""), "stage"),
    (dict(epochs=0), "epochs"),
    (dict(epochs=True), "epochs"),
    (dict(seed=-1), "seed"),
    (dict(keep=0), "keep"),
    (dict(dataset=""), "dataset"),
    (dict(model={"hiden": [3]}), "model.hiden"),
    (dict(solver={"lr": "fast"}), "solver.lr"),
    (dict(data={"val_fraction": 0.9}), "data.val_fraction"),
    (dict(data={"preprocess": "whiten"}), "data.preprocess"),
    (dict(params={"solver.lr": float("nan")}), "params.solver.lr"),
    (dict(parent="../x"), "parent"),
])
def test_invalid_fields_are_named(over, field):
    with pytest.raises(SpecError, match=f"^{field}"):
        make(**over)


def test_from_dict_names_unknown_and_missing_fields():
    d = make().to_dict()
    with pytest.raises(SpecError, match="^bogus: unknown"):
        TrialSpec.from_dict({**d, "bogus": 1})
    del d["dataset"]
    with pytest.raises(SpecError, match="^dataset: missing"):
        TrialSpec.from_dict(d)
    with pytest.raises(SpecError, match="JSON object"):
        TrialSpec.from_dict(["not", "a", "dict"])


def test_absurd_model_size_is_refused_without_allocating():
    with pytest.raises(SpecError, match="^model"):
        make(model={"hidden": [10**9]})


def test_states_and_ids():
    assert {s for s in TrialState if s.terminal} == TERMINAL_STATES
    assert not TrialState.RUNNING.terminal and TrialState.KILLED.terminal
    assert TrialState("DIVERGED") is TrialState.DIVERGED
    assert trial_id("coarse", 42) == "coarse-0042"
