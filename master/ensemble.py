"""Ensembles of the best trials' checkpoints (softmax averaging, greedy selection) and prediction on new data."""
from __future__ import annotations

import logging
import math
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from master.leaderboard import build_leaderboard, collapse_runs
from nncore.data import Dataset, apply_preprocessing, load_dataset_cached, preprocessing_stats
from nncore.io import check_npz_sizes
from nncore.losses import softmax
from nncore.model import build_model
from nncore.solver import Solver
from worker.spec import SpecError, TrialSpec, check_name
from worker.store import (Checkpoint, ExperimentStore, StorageError, atomic_write_npz)

log = logging.getLogger(__name__)

METHODS = ("average", "greedy")
GREEDY_ROUNDS = 50  # forward-selection steps; the selection after the best step is kept
_EPS = 1e-12
_TOL = 1e-9  # a log-loss gain smaller than this is rounding, not improvement


class EnsembleError(ValueError):
    """An ensemble cannot be built or run: one line naming the trial, checkpoint, ensemble or input file."""


@dataclass(frozen=True)
class Member:
    """One checkpoint of one trial, restored on its training data with its raw or running-average parameters."""

    trial: str
    checkpoint: str
    epoch: int
    spec: TrialSpec
    data: Dataset
    solver: Solver
    params: dict[str, np.ndarray]

    def proba(self, x: np.ndarray) -> np.ndarray:
        """Softmax class probabilities for x (preprocessed like the training data), in test mode."""
        return softmax(self.solver.scores(x, self.params))


def load_member(store: ExperimentStore, trial: str, checkpoint: Checkpoint, ema: bool) -> Member:
    """The model stored in ``checkpoint`` (parameters restored through the Solver's own state-array naming,
    on the trial's own data split); StorageError / EnsembleError naming the file when it is unusable."""
    arrays, carried = store.read_checkpoint(checkpoint)
    try:
        spec = TrialSpec.from_dict(carried if carried is not None else store.read_spec(trial))
    except (SpecError, TypeError) as exc:
        raise EnsembleError(f"{checkpoint.path}: no usable trial spec ({exc})") from None
    data = load_dataset_cached(spec.dataset, **spec.data)
    model = build_model(spec.model, data.input_shape, data.num_classes, seed=spec.seed)
    solver = Solver(model, data, spec.solver, seed=spec.seed)
    try:
        solver.load_state_arrays(arrays)
    except (KeyError, ValueError) as exc:
        raise EnsembleError(f"{checkpoint.path}: does not fit the trial's model ({exc})") from None
    return Member(trial, checkpoint.path.name, checkpoint.epoch, spec, data, solver,
                  solver.ema_params if ema else model.params)


def readable_members(store: ExperimentStore, trial: str, ema: bool, limit: int) -> list[Member]:
    """Up to ``limit`` of the trial's best checkpoints, skipping unusable ones with a warning naming them."""
    members = []
    for checkpoint in store.checkpoints(trial):
        if len(members) == limit:
            break
        try:
            members.append(load_member(store, trial, checkpoint, ema))
        except (StorageError, EnsembleError) as exc:
            log.warning("skipping %s", exc)
    return members


def check_same_data(members: list[Member]) -> None:
    """Refuse members trained on different data (dataset name, split or preprocessing)."""
    first = members[0]
    for member in members[1:]:
        if (member.spec.dataset, member.spec.data) != (first.spec.dataset, first.spec.data):
            raise EnsembleError(f"trials {first.trial} and {member.trial} were trained on different data "
                                f"({first.spec.dataset} {first.spec.data} vs {member.spec.dataset} "
                                f"{member.spec.data})")


def accuracy(proba: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(proba.argmax(axis=-1) == y))


def greedy_selection(probas: np.ndarray, y: np.ndarray, rounds: int = GREEDY_ROUNDS) -> np.ndarray:
    """How often each model is picked by forward selection with replacement (Caruana et al., 2004).

    ``probas`` (models, samples, classes) on the selection set, ``y`` its labels. Each round adds the model
    whose inclusion gives the averaged probabilities the best accuracy (ties: lower log loss, then the lower
    index); the counts after the best round (the earliest on ties, up to rounding) are returned. Deterministic.
    """
    n_models, n = probas.shape[:2]
    rows = np.arange(n)
    total = np.zeros(probas.shape[1:], dtype=np.float64)
    counts = np.zeros(n_models, dtype=np.int64)
    best_counts, best_acc, best_nll = counts, -math.inf, math.inf
    for step in range(1, rounds + 1):
        candidates = (total + probas) / step
        acc = (candidates.argmax(axis=2) == y).mean(axis=1)
        nll = -np.log(np.maximum(candidates[:, rows, y], _EPS)).mean(axis=1)
        pick = int(np.lexsort((np.arange(n_models), nll, -acc))[0])
        total += probas[pick]
        counts = counts.copy()
        counts[pick] += 1
        if acc[pick] > best_acc or (acc[pick] == best_acc and nll[pick] < best_nll - _TOL):
            best_counts, best_acc, best_nll = counts, acc[pick], nll[pick]
    return best_counts


def combine(probas: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted average of the members' probabilities: (models, samples, classes) -> (samples, classes)."""
    return np.tensordot(weights / weights.sum(), probas, axes=1)


def default_name(top: int, method: str, ema: bool, snapshots: int) -> str:
    return f"top{top}-{method}" + ("-ema" if ema else "") + (f"-snap{snapshots}" if snapshots > 1 else "")


def build_ensemble(store: ExperimentStore, top: int, method: str = "average", ema: bool = False,
                   snapshots: int = 1, name: str | None = None) -> dict[str, Any]:
    """Ensemble the ``top`` best runs (a promoted trial and its parents are one run; each member brings its
    ``snapshots`` best checkpoints), score it on validation and test, write ``ensembles/<name>.json``
    atomically and return that record."""
    if method not in METHODS:
        raise EnsembleError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    name = check_name(name or default_name(top, method, ema, snapshots), "ensemble name")
    members: list[Member] = []
    trials: list[str] = []
    ranked = collapse_runs(store, build_leaderboard(store))
    for trial in ranked.loc[ranked["val_acc"].notna(), "trial"]:
        if len(trials) == top:
            break
        found = readable_members(store, trial, ema, snapshots)
        if found:
            trials.append(trial)
            members += found
        else:
            log.warning("skipping trial %s: no readable checkpoint in %s", trial, store.trial_dir(trial))
    if not members:
        raise EnsembleError(f"experiment {store.experiment}: no trial with a readable checkpoint in {store.dir}")
    if len(trials) < top:
        log.warning("only %d trials with a readable checkpoint, fewer than --top %d", len(trials), top)
    check_same_data(members)
    data = members[0].data
    val = np.stack([m.proba(data.x_val) for m in members])
    test = np.stack([m.proba(data.x_test) for m in members])
    weights = (np.ones(len(members)) if method == "average" else greedy_selection(val, data.y_val)).astype(float)
    weights /= weights.sum()
    single = [{"trial": m.trial, "checkpoint": m.checkpoint, "epoch": m.epoch, "weight": float(w),
               "val_acc": accuracy(v, data.y_val), "test_acc": accuracy(t, data.y_test)}
              for m, w, v, t in zip(members, weights, val, test)]
    best = max(single, key=lambda s: s["val_acc"])  # the model one would deploy without an ensemble
    scores = {}
    for split, probas, y in (("val", val, data.y_val), ("test", test, data.y_test)):
        ens = accuracy(combine(probas, weights), y)
        scores[split] = {"ensemble": ens, "best_single": best[f"{split}_acc"], "gain": ens - best[f"{split}_acc"]}
    record = {
        "name": name, "experiment": store.experiment, "created_at": time.time(), "method": method, "ema": ema,
        "top": top, "snapshots": snapshots, "trials": trials, "best_single": best["trial"],
        "dataset": members[0].spec.dataset, "data": members[0].spec.data,
        "samples": {"val": len(data.y_val), "test": len(data.y_test)},
        "members": single, "scores": scores,
    }
    store.write_ensemble(record)
    return record


def render_ensemble(record: dict[str, Any]) -> Table:
    """A rich table: each member's weight and accuracies, then the ensemble and its gain over the best single."""
    val, test = record["scores"]["val"], record["scores"]["test"]
    table = Table(title=f"ensemble {record['name']} ({record['method']}{', EMA' if record['ema'] else ''}): "
                        f"{record['samples']['val']} val / {record['samples']['test']} test samples",
                  title_justify="left")
    for column in ("member", "epoch", "weight", "val acc", "test acc"):
        table.add_column(column, justify="left" if column == "member" else "right")
    for m in record["members"]:
        style = "bold" if m["trial"] == record["best_single"] and m["val_acc"] == val["best_single"] else ""
        table.add_row(m["trial"], str(m["epoch"]), f"{m['weight']:.3f}", f"{m['val_acc']:.4f}",
                      f"{m['test_acc']:.4f}", style=style or None)
    table.add_section()
    table.add_row("ensemble", "", "1.000", f"{val['ensemble']:.4f}", f"{test['ensemble']:.4f}", style="bold")
    table.add_row(f"gain over {record['best_single']}", "", "", f"{100 * val['gain']:+.2f} pts",
                  f"{100 * test['gain']:+.2f} pts")
    return table


def read_record(store: ExperimentStore, name: str) -> dict[str, Any] | None:
    """The recorded ensemble ``name``; None, with a warning naming the file, when it is corrupt or foreign."""
    record = store.read_ensemble(name)
    if isinstance(record, dict) and isinstance(record.get("members"), list) \
            and isinstance(record.get("scores"), dict):
        return record
    if record is not None:
        log.warning("skipping %s: not an ensemble record", store.ensemble_path(name))
    return None


def read_ensembles(store: ExperimentStore) -> list[dict[str, Any]]:
    """Every readable ensemble record of the experiment, by name."""
    found = (read_record(store, name) for name in store.ensemble_names())
    return [record for record in found if record is not None]


def _ensemble_members(store: ExperimentStore, name: str) -> list[tuple[Member, float]]:
    """(member, weight) of every member of the recorded ensemble ``name`` with a positive weight."""
    path = store.ensemble_path(name)
    record = read_record(store, name)
    if record is None:
        raise EnsembleError(f"ensemble {name}: no readable {path} "
                            f"(ensembles: {', '.join(store.ensemble_names()) or 'none'})")
    members = []
    for entry in record["members"]:
        try:
            trial, file, weight = entry["trial"], entry["checkpoint"], float(entry["weight"])
            checkpoint = Checkpoint.parse(store.trial_dir(trial) / file)
        except (KeyError, TypeError, ValueError, SpecError):
            raise EnsembleError(f"{path}: malformed member entry {entry!r}") from None
        if weight <= 0:
            continue
        if checkpoint is None or not checkpoint.path.is_file():
            raise EnsembleError(f"ensemble {name}: member checkpoint {store.trial_dir(trial) / file} is gone")
        try:
            members.append((load_member(store, trial, checkpoint, bool(record.get("ema"))), weight))
        except StorageError as exc:
            raise EnsembleError(f"ensemble {name}: {exc}") from None
    if not members:
        raise EnsembleError(f"{path}: no member with a positive weight")
    return members


def read_input(path: Path) -> np.ndarray:
    """Array ``x`` of an .npz file, numbers only and never unpickled; EnsembleError naming the file otherwise."""
    try:
        check_npz_sizes(path)
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive.files:
                raise EnsembleError(f"{path}: no array 'x' (arrays: {', '.join(archive.files) or 'none'})")
            x = archive["x"]
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise EnsembleError(f"{path}: x is an object array; pickled data is refused, save plain numbers") from None
        raise EnsembleError(f"{path}: not a readable .npz file ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile, MemoryError) as exc:
        raise EnsembleError(f"{path}: not a readable .npz file ({exc or 'too large for memory'})") from None
    if x.dtype.kind not in "biuf":
        raise EnsembleError(f"{path}: x has dtype {x.dtype}, expected numbers")
    if x.ndim < 2:
        raise EnsembleError(f"{path}: x has shape {x.shape}, expected (samples, features...)")
    if not np.isfinite(x).all():
        raise EnsembleError(f"{path}: x has non-finite values")
    return x


def resolve_members(store: ExperimentStore, *, ensemble: str | None = None, trial: str | None = None,
                    ema: bool = False) -> list[tuple[Member, float]]:
    """(member, weight) of a recorded ensemble, or of one trial's best checkpoint (weight 1)."""
    if (ensemble is None) == (trial is None):
        raise EnsembleError("give exactly one of --ensemble NAME or --trial ID")
    if ensemble is not None and ema:
        raise EnsembleError("--ema applies to --trial; an ensemble runs with the parameters it was built with")
    if ensemble is not None:
        weighted = _ensemble_members(store, ensemble)
    else:
        found = readable_members(store, check_name(trial, "trial"), ema, 1)
        if not found:
            raise EnsembleError(f"trial {trial}: no readable checkpoint in {store.trial_dir(trial)}")
        weighted = [(found[0], 1.0)]
    check_same_data([m for m, _ in weighted])
    return weighted


def predict_raw(weighted: list[tuple[Member, float]], x: np.ndarray, where: str = "x") -> dict[str, np.ndarray]:
    """``proba``, ``classes`` and ``pred`` of the weighted members on raw samples ``x`` (preprocessed here like
    their training data); EnsembleError naming ``where`` when the samples do not fit the model."""
    first = weighted[0][0]
    expected = first.data.input_shape
    if x.shape[1:] != expected:
        raise EnsembleError(f"{where}: x has samples of shape {x.shape[1:]}, the model expects {expected}")
    spec = first.spec
    raw = load_dataset_cached(spec.dataset, **{**spec.data, "preprocess": "none"})
    x = x.astype(np.float32)
    apply_preprocessing(x, *preprocessing_stats(raw.x_train, spec.data["preprocess"]))
    probas = np.stack([m.proba(x) for m, _ in weighted])
    proba = combine(probas, np.array([w for _, w in weighted], dtype=float)).astype(np.float32)
    data = first.data
    classes = np.arange(data.num_classes, dtype=np.int64) if data.classes is None else data.classes
    return {"proba": proba, "classes": classes, "pred": classes[proba.argmax(axis=1)]}


def predict(store: ExperimentStore, input_path: Path, output_path: Path, *, ensemble: str | None = None,
            trial: str | None = None, ema: bool = False) -> dict[str, np.ndarray]:
    """Run an ensemble (or one trial's best checkpoint) on the raw samples ``x`` of ``input_path``,
    preprocessed like its training data; write ``proba`` (samples, classes), ``classes`` (the label of each
    column of proba, as the dataset spelled it) and ``pred`` (the predicted labels, from ``classes``)."""
    if not output_path.parent.is_dir():
        raise EnsembleError(f"{output_path}: directory {output_path.parent} does not exist")
    weighted = resolve_members(store, ensemble=ensemble, trial=trial, ema=ema)
    out = predict_raw(weighted, read_input(input_path), str(input_path))
    atomic_write_npz(output_path, out)
    return out
