"""The life cycles of trials and stages: every allowed move goes through the store's one transition function,
every other move is refused, and nothing is written when it is."""
import itertools
import json

import pytest

from worker.records import RecordError, StageRecord, TrialResult
from worker.states import (STAGE_TRANSITIONS, TERMINAL_STATES, TRIAL_TRANSITIONS, IllegalTransition, StageStatus,
                           TrialState)
from worker.store import ExperimentStore

from conftest import record_stage

ORIGINS = [None, *TrialState]


def at(store, tid, state):
    """Put trial ``tid`` in ``state`` (None: no record) along allowed moves only."""
    path = {None: [], TrialState.QUEUED: [TrialState.QUEUED], TrialState.RUNNING: [TrialState.RUNNING]}
    for step in path.get(state, [TrialState.RUNNING, state]):
        store.transition(tid, step, f"to {step.value}", "setup")


@pytest.fixture
def store(tmp_path):
    return ExperimentStore(tmp_path, "exp").ensure()


def test_the_trial_life_cycle_is_the_documented_one():
    terminal = set(TERMINAL_STATES)
    assert set(TRIAL_TRANSITIONS) == set(ORIGINS)
    assert TRIAL_TRANSITIONS[None] == {TrialState.QUEUED, TrialState.RUNNING}
    assert TRIAL_TRANSITIONS[TrialState.QUEUED] == {TrialState.QUEUED, TrialState.RUNNING}
    assert TRIAL_TRANSITIONS[TrialState.RUNNING] == {TrialState.QUEUED, TrialState.RUNNING} | terminal
    for state in terminal:  # an outcome is final until the trial is queued (or, by hand, run) again
        assert TRIAL_TRANSITIONS[state] == {TrialState.QUEUED, TrialState.RUNNING}
    assert {s for s in TrialState if s.terminal} == terminal == {TrialState.COMPLETED, TrialState.KILLED,
                                                                 TrialState.DIVERGED, TrialState.FAILED}
    assert {s for s in TrialState if s.ranked} == terminal - {TrialState.FAILED}


@pytest.mark.parametrize("old, new", list(itertools.product(ORIGINS, TrialState)))
def test_every_trial_move_is_performed_or_refused_by_the_one_function(store, old, new):
    tid = "coarse-0000"
    at(store, tid, old)
    before = store.read_result(tid)
    events = store.read_events(tid)
    if new in TRIAL_TRANSITIONS[old]:
        record = store.transition(tid, new, "because", "moved", {"worker": "w1"}, epochs_done=3)
        assert store.read_result(tid) == record
        assert (record.state, record.reason, record.epochs_done) == (new, "because", 3)
        assert (record.finished_at is not None) == new.terminal and record.updated_at is not None
        assert store.read_events(tid)[len(events):] == [{"time": record.updated_at, "event": "moved",
                                                         "state": new.value, "reason": "because", "worker": "w1"}]
    else:
        with pytest.raises(IllegalTransition, match=f"trial {tid}: cannot move from "
                                                    f"{old.value if old else 'no record'} to {new.value}"):
            store.transition(tid, new, "because", "moved")
        assert store.read_result(tid) == before and store.read_events(tid) == events  # nothing written


@pytest.mark.parametrize("old, new", list(itertools.product([None, *StageStatus], StageStatus)))
def test_every_stage_move_is_performed_or_refused(store, old, new):
    if old is not None:
        record_stage(store, "coarse", ["coarse-0000"], status=StageStatus.LAUNCHED.value)
        if old is not StageStatus.LAUNCHED:
            store.set_stage_status("coarse", old)
    before = store.read_stage("coarse")
    allowed = new in STAGE_TRANSITIONS[old]
    if old is None:  # a stage that was never launched has no record to move
        if allowed:
            record_stage(store, "coarse", ["coarse-0000"], status=new.value)
            assert store.read_stage("coarse").status is new
        else:
            with pytest.raises(IllegalTransition, match=f"stage coarse: cannot move from not launched to {new.value}"):
                record_stage(store, "coarse", ["coarse-0000"], status=new.value)
            assert store.read_stage("coarse") is None
        return
    if allowed:
        record = store.set_stage_status("coarse", new, summary="s")
        assert store.read_stage("coarse") == record and (record.status, record.summary) == (new, "s")
    else:
        with pytest.raises(IllegalTransition, match=f"stage coarse: cannot move from {old.value} to {new.value}"):
            store.set_stage_status("coarse", new)
        assert store.read_stage("coarse") == before


def test_a_completed_stage_is_only_reopened_by_a_new_launch():
    assert STAGE_TRANSITIONS[StageStatus.COMPLETED] == {StageStatus.LAUNCHED, StageStatus.COMPLETED}
    assert STAGE_TRANSITIONS[None] == {StageStatus.LAUNCHED}


def test_records_round_trip_and_name_the_bad_field():
    result = TrialResult("coarse-0001", TrialState.KILLED, "stopped", "w1", 0.9, 3, 4, 1.5, 10.0, "val0.9000_ep003.npz")
    assert TrialResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    stage = StageRecord("coarse", "random", 1, 0, ("coarse-0000",), StageStatus.COMPLETED, flags=({"name": "x"},),
                        flag_messages=("m",))
    assert StageRecord.from_dict(json.loads(json.dumps(stage.to_dict()))) == stage
    assert TrialResult.from_dict({"trial_id": "t", "state": "QUEUED", "future_field": 1}).state is TrialState.QUEUED
    for doc, message in (([1], "expected a JSON object"), ({"state": "QUEUED"}, "trial_id: missing"),
                         ({"trial_id": "t", "state": "DONE"}, "state: 'DONE' is not one of"),
                         ({"trial_id": "t", "state": "QUEUED", "best_val_acc": "high"}, "best_val_acc"),
                         ({"trial_id": "t", "state": "QUEUED", "epochs_done": True}, "epochs_done")):
        with pytest.raises(RecordError, match=message):
            TrialResult.from_dict(doc)


def test_a_record_that_is_not_one_is_skipped_with_a_warning_naming_the_file(store, caplog):
    store.trial_dir("coarse-0000").mkdir(parents=True)
    (store.trial_dir("coarse-0000") / "result.json").write_text("[1, 2]")
    assert store.read_result("coarse-0000") is None
    assert f"{store.trial_dir('coarse-0000') / 'result.json'}: not a TrialResult" in caplog.text
