"""The life cycles of a trial and of a stage: their states and the transitions allowed between them, in one place.

A trial (``TrialState``)::

    (new) -> QUEUED -> RUNNING -> COMPLETED | KILLED | DIVERGED | FAILED
               ^                                                    |
               |  requeue (worker lost, Redis lost its job, Ctrl-C),|
               +---------------- retry, --force --------------------+

A worker runs whatever job it is given, so it may also start a trial no master recorded (new -> RUNNING), one
that has an outcome (a job re-run by hand, e.g. ``rq requeue``), or one whose record still says RUNNING (the job
was re-delivered after its worker vanished). Only ``ExperimentStore.transition`` moves a trial, checking its
move here; only ``ExperimentStore.set_stage_status`` (and ``write_stage``, for a launch) moves a stage.
"""
from __future__ import annotations

import enum


class IllegalTransition(ValueError):
    """A move the life cycle does not allow, e.g. COMPLETED -> RUNNING without being queued again."""


class TrialState(str, enum.Enum):
    """Where a trial is in its life cycle; the value is what result.json and Redis hold."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    KILLED = "KILLED"
    DIVERGED = "DIVERGED"
    FAILED = "FAILED"

    @property
    def terminal(self) -> bool:
        """True once the trial has an outcome (a retry or --force may still queue it again)."""
        return self in TERMINAL_STATES

    @property
    def ranked(self) -> bool:
        """True for outcomes with a meaningful validation accuracy (narrowing and promotion rank them)."""
        return self in (TrialState.COMPLETED, TrialState.KILLED, TrialState.DIVERGED)


TERMINAL_STATES = frozenset({TrialState.COMPLETED, TrialState.KILLED, TrialState.DIVERGED, TrialState.FAILED})
_AFTER_TERMINAL = frozenset({TrialState.QUEUED, TrialState.RUNNING})
TRIAL_TRANSITIONS: dict[TrialState | None, frozenset[TrialState]] = {
    None: frozenset({TrialState.QUEUED, TrialState.RUNNING}),
    TrialState.QUEUED: frozenset({TrialState.QUEUED, TrialState.RUNNING}),
    TrialState.RUNNING: frozenset({TrialState.QUEUED, TrialState.RUNNING} | TERMINAL_STATES),
    **{state: _AFTER_TERMINAL for state in TERMINAL_STATES},
}


class StageStatus(str, enum.Enum):
    """How following a stage last ended; the value is what stages/<stage>.json holds."""

    LAUNCHED = "launched"  # recorded and enqueued; trials may still be running
    COMPLETED = "completed"  # every trial finished (failed ones out of retries); border flags recorded
    INCOMPLETE = "incomplete"  # the local workers exited before every trial finished
    INTERRUPTED = "interrupted"  # Ctrl-C during an embedded launch; launching again resumes it


_REOPENABLE = frozenset(StageStatus)
STAGE_TRANSITIONS: dict[StageStatus | None, frozenset[StageStatus]] = {
    None: frozenset({StageStatus.LAUNCHED}),
    StageStatus.LAUNCHED: _REOPENABLE,
    StageStatus.COMPLETED: frozenset({StageStatus.LAUNCHED, StageStatus.COMPLETED}),
    StageStatus.INCOMPLETE: _REOPENABLE,
    StageStatus.INTERRUPTED: _REOPENABLE,
}


def check_trial_transition(trial_id: str, old: TrialState | None, new: TrialState) -> None:
    """Raise IllegalTransition unless a trial may move from ``old`` (None: no record yet) to ``new``."""
    if new not in TRIAL_TRANSITIONS[old]:
        raise IllegalTransition(f"trial {trial_id}: cannot move from {old.value if old else 'no record'} to "
                                f"{new.value}")


def check_stage_transition(stage: str, old: StageStatus | None, new: StageStatus) -> None:
    """Raise IllegalTransition unless a stage may move from ``old`` (None: not launched) to ``new``."""
    if new not in STAGE_TRANSITIONS[old]:
        raise IllegalTransition(f"stage {stage}: cannot move from {old.value if old else 'not launched'} to "
                                f"{new.value}")
