"""The Python API for scripts and notebooks (``import master.api as hypersearch``): open an experiment, its results
as DataFrames, trained models and ensembles ready to predict, and launch a search, through the CLI's functions."""
from __future__ import annotations

import builtins
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from master import dispatch
from master.ensemble import Member, predict_raw, read_record, resolve_members
from master.experiment import ExperimentError, experiment_config, open_experiment
from master.launcher import Reporter, launch as run_launch, prepare
from master.leaderboard import BASE_COLUMNS, build_leaderboard
from worker.states import TrialState
from worker.store import ExperimentStore

__all__ = ["Experiment", "Model", "Ensemble", "open", "launch"]

log = logging.getLogger(__name__)

STATE_DTYPE = pd.CategoricalDtype([s.value for s in TrialState])
TEXT_COLUMNS = ("trial", "stage", "reason", "worker")
FLOAT_COLUMNS = ("val_acc", "train_acc", "seconds")


@dataclass(frozen=True)
class Model:
    """One trial's checkpoint restored as an nncore model: ``predict`` takes raw samples like ``master predict``."""

    member: Member

    @property
    def spec(self) -> Any:
        return self.member.spec

    @property
    def model(self) -> Any:
        """The nncore model (its parameters are in ``params``)."""
        return self.member.solver.model

    @property
    def params(self) -> dict[str, np.ndarray]:
        return self.member.params

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (samples, classes) of raw samples ``x``, preprocessed like the training data."""
        return predict_raw([(self.member, 1.0)], np.asarray(x))["proba"]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted labels of raw samples ``x`` (as the dataset spelled them)."""
        return predict_raw([(self.member, 1.0)], np.asarray(x))["pred"]


@dataclass(frozen=True)
class Ensemble:
    """A recorded ensemble: its record (members, weights, scores) and ``predict`` on raw samples."""

    record: dict[str, Any]
    weighted: list[tuple[Member, float]]

    @property
    def members(self) -> pd.DataFrame:
        """One row per member checkpoint: trial, checkpoint, epoch, weight, val_acc, test_acc."""
        return pd.DataFrame(self.record["members"])

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return predict_raw(self.weighted, np.asarray(x))["proba"]

    def predict(self, x: np.ndarray) -> np.ndarray:
        return predict_raw(self.weighted, np.asarray(x))["pred"]


def typed_leaderboard(df: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard with notebook dtypes: text as ``string``, state as a category, numbers as floats or Int64,
    hyperparameters inferred (lists such as ``model.hidden`` stay objects)."""
    out = df.copy()
    for column in TEXT_COLUMNS:
        out[column] = out[column].astype("string")
    out["state"] = out["state"].astype(STATE_DTYPE)
    for column in FLOAT_COLUMNS:
        out[column] = pd.to_numeric(out[column], errors="coerce").astype("float64")
    for column in ("best_epoch", "epochs"):
        out[column] = out[column].astype("Int64")
    params = [c for c in out.columns if c not in BASE_COLUMNS]
    out[params] = out[params].infer_objects()
    return out


class Experiment:
    """An experiment in shared storage, read afresh on every call (so a running search shows its progress)."""

    def __init__(self, store: ExperimentStore):
        self.store = store

    @property
    def name(self) -> str:
        return self.store.experiment

    @property
    def path(self) -> Path:
        return self.store.dir

    def __repr__(self) -> str:
        return f"Experiment({self.name!r}, {str(self.path)!r})"

    def config(self) -> Any:
        """The ExperimentConfig the experiment was launched with."""
        return experiment_config(self.store)

    def leaderboard(self, stage: str | None = None) -> pd.DataFrame:
        """One row per trial (of ``stage`` if given), best validation accuracy first, hyperparameters as columns."""
        return typed_leaderboard(build_leaderboard(self.store.snapshot(), stage=stage))

    def best(self, k: int = 1, stage: str | None = None) -> pd.DataFrame:
        """The ``k`` best trials with a validation accuracy."""
        df = self.leaderboard(stage)
        return df[df["val_acc"].notna()].head(k).reset_index(drop=True)

    def history(self, trial_id: str) -> pd.DataFrame:
        """One row per epoch of ``trial_id``: losses, accuracies, lr, seconds, ``update_ratio.<layer>``; the
        babysitting records stay as objects in ``loss_trace`` and ``babysit``, and so do the sub-epoch scores in
        ``val_points`` (a stage with ``val_points`` > 1)."""
        self._check_trial(trial_id)
        records = self.store.read_history(trial_id)
        if not records:
            return pd.DataFrame({"epoch": pd.Series(dtype="int64")}).set_index("epoch")
        flat = [{**{k: v for k, v in r.items() if k != "update_ratio"},
                 **{f"update_ratio.{layer}": v for layer, v in (r.get("update_ratio") or {}).items()}}
                for r in records]
        return pd.DataFrame(flat).set_index("epoch")

    def events(self, trial_id: str) -> pd.DataFrame:
        """What happened to ``trial_id`` and why (queued, started, finished, stop requested), oldest first."""
        self._check_trial(trial_id)
        return pd.DataFrame(self.store.read_events(trial_id))

    def checkpoints(self, trial_id: str) -> list[Path]:
        """The trial's checkpoint files, best validation accuracy first."""
        self._check_trial(trial_id)
        return [c.path for c in self.store.checkpoints(trial_id)]

    def load_model(self, trial_id: str, ema: bool = False) -> Model:
        """The trial's best checkpoint as a model ready to ``predict`` (``ema``: the running-average parameters)."""
        self._check_trial(trial_id)
        return Model(resolve_members(self.store, trial=trial_id, ema=ema)[0][0])

    def ensembles(self) -> list[str]:
        return self.store.ensemble_names()

    def ensemble(self, name: str) -> Ensemble:
        """The recorded ensemble ``name`` (built with ``master ensemble``), ready to ``predict``."""
        weighted = resolve_members(self.store, ensemble=name)
        return Ensemble(read_record(self.store, name), weighted)

    def _check_trial(self, trial_id: str) -> None:
        if trial_id not in self.store.trial_ids():
            raise ExperimentError(f"trial {trial_id}: not in experiment {self.name} (see .leaderboard())")


def open(path: str | os.PathLike[str] | None = None, experiment: str | None = None) -> Experiment:  # noqa: A001
    """The experiment at ``path`` (its folder, holding experiment.json), or ``experiment`` (default: the most
    recently changed one) of the storage root ``path`` (default: $HYPERSEARCH_STORAGE, else ./checkpoints)."""
    if path is not None and experiment is None and (Path(path) / "experiment.json").is_file():
        path, experiment = Path(path).resolve().parent, Path(path).resolve().name
    return Experiment(open_experiment(path, experiment))


def launch(config: str | os.PathLike[str] | None = None, stage: str | builtins.list[str] | None = None, *,
           storage: str | os.PathLike[str] | None = None, url: str | None = None,
           queue: str = dispatch.DEFAULT_QUEUE, seed: int | None = None, trials: int | None = None,
           workers: int | None = None, wait: bool = True, force: bool = False, all_stages: bool = False,
           reporter: Reporter | None = None) -> Experiment:
    """Run the same search as ``master launch`` (same trial ids and parameters for the same config and seed): the
    config's first stage, ``stage`` (a name or a list), or ``all_stages``; embedded unless ``url`` or $REDIS_URL.
    Returns the experiment; logs a warning when a stage ended incomplete or interrupted."""
    setup = prepare(config, storage=storage, url=url, queue=queue, workers=workers, force=force)
    names = [s.name for s in setup.config.stages] if all_stages else [stage] if isinstance(stage, str) else stage
    code = run_launch(setup, names, seed=seed, trials=trials, wait=wait or setup.embedded,
                      reporter=reporter or Reporter())
    if code:
        log.warning("launch of %s ended with exit code %d (a stage is unfinished)", setup.store.experiment, code)
    return Experiment(setup.store)
