"""The live dashboard behind ``master serve``: a Flask app whose JSON endpoints read shared storage incrementally
(a trial's files are read again only when their modification time or size changed) and Redis when it answers."""
from __future__ import annotations

import functools
import heapq
import hmac
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from flask import Flask, abort, jsonify, redirect, request, send_from_directory

from master import dispatch
from master.ensemble import read_ensembles
from master.experiment import (ExperimentError, experiment_config, kill_trial, live_dispatcher, live_progress,
                               watch_findings)
from master.launcher import Launch, LaunchError, Reporter, launch
from master.leaderboard import BASE_COLUMNS, funnel, trial_row
from master.lineage import chain_to, chains, run_history
from master.monitor import failing_workers, worker_outcomes
from master.stages import border_flags
from nncore.errors import ConfigError
from worker.records import TrialResult
from worker.spec import NAME_RE
from worker.states import StageStatus, TrialState
from worker.store import ExperimentStore, list_experiments, storage_root

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
TOKEN_HEADER = "X-Hypersearch-Token"
CURVE_KEYS = ("val_acc", "train_acc", "train_loss", "val_loss")
RUNNING_CURVES = 12  # running trials whose curves are sent
TOP_CURVES = 5  # finished trials whose curves are sent
SLOW_SECONDS = 5.0  # border flags, quarantine and ensembles are recomputed at most this often
REDIS_RETRY_SECONDS = 10.0
MAX_ROWS = 1000
FULL_SCAN_SECONDS = 10.0  # every trial folder is looked at again this often (a finished trial queued again)
RACY_NS = 2_000_000_000  # a file changed this recently is read again (coarse and skewed clocks)


class DashboardError(ExperimentError):
    """The dashboard cannot start: the message names the storage root, experiment or port."""


def _finite(value: Any) -> Any:
    """``value`` with NaN/inf (and pandas' NA) as None, so the JSON is valid."""
    if value is None or value is pd.NA or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return value


class LiveStore(ExperimentStore):
    """An experiment read incrementally: ``refresh`` lists the trial folders and their modification times; a
    trial's spec and result are read again only when its folder changed (they are replaced by atomic renames),
    its history only when history.jsonl's size or time changed (it is appended to), never for a finished trial."""

    def __init__(self, root: str | os.PathLike[str], experiment: str):
        super().__init__(root, experiment)
        self._dirs: dict[str, int] = {}
        self._now = self._full_at = 0
        self._listing: int | None = -1
        self._hot: list[str] = []
        self.changed: list[str] = []  # the trials the last refresh looked at again
        self._hsig: dict[str, tuple[int, Any]] = {}
        self._hfile: dict[str, tuple[int, bool]] = {}
        self._ids: list[str] = []
        self._spec: dict[str, tuple[int, Any]] = {}
        self._result: dict[str, tuple[int, TrialResult | None]] = {}
        self._history: dict[str, tuple[Any, list[dict[str, Any]]]] = {}

    def refresh(self) -> None:
        """Look again at the trial folders that may change (unfinished, or changed within the racy window) and set
        ``changed`` to them; every folder (one stat each, no file opened) when the trial list changed or the last
        full look is FULL_SCAN_SECONDS old (a finished trial changes again only when it is queued again)."""
        now = time.time_ns()
        try:
            listing = os.stat(self.trials_dir).st_mtime_ns
        except OSError:
            listing = None
        full = listing != self._listing or now - self._full_at > FULL_SCAN_SECONDS * 1e9 or now - listing < RACY_NS
        self._now = now
        if full:
            self._scan_all()
            self._listing, self._full_at = listing, now
            self.changed = self._ids
        else:
            for tid in self._hot:
                try:
                    self._dirs[tid] = os.stat(f"{self.trials_dir}/{tid}").st_mtime_ns
                except OSError:
                    self._dirs.pop(tid, None)
            self.changed = [t for t in self._hot if t in self._dirs]
        self._hot = [t for t in self.changed if self.folder_sig(t) is None
                     or not ((r := self.read_result(t)) is not None and r.terminal)]

    def _scan_all(self) -> None:
        dirs: dict[str, int] = {}
        try:
            with os.scandir(self.trials_dir) as entries:
                for entry in entries:
                    try:
                        dirs[entry.name] = entry.stat().st_mtime_ns
                    except OSError:
                        continue
        except (FileNotFoundError, NotADirectoryError):
            pass
        self._dirs = dirs
        for cache in (self._spec, self._result, self._history, self._hsig, self._hfile):
            for gone in set(cache) - set(dirs):
                del cache[gone]
        self._ids = sorted(t for t in dirs if NAME_RE.match(t) and self.read_spec(t) is not None)

    def trial_ids(self) -> list[str]:
        return self._ids

    def folder_sig(self, trial_id: str) -> int | None:
        """The folder's modification time; None (read afresh) when unknown or so recent that a change within the
        same clock tick could hide behind it (file systems stamp times coarsely, NFS clocks differ)."""
        sig = self._dirs.get(trial_id)
        return None if sig is None or self._now - sig < RACY_NS else sig

    def _cached(self, cache: dict[str, tuple[Any, Any]], key: Any, trial_id: str, read: Callable[[str], Any]) -> Any:
        key = ("refresh", self._now) if key is None else key  # untrusted: read once per refresh
        hit = cache.get(trial_id)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = read(trial_id)
        cache[trial_id] = (key, value)
        return value

    def read_spec(self, trial_id: str) -> dict[str, Any] | None:
        return self._cached(self._spec, self.folder_sig(trial_id), trial_id, super().read_spec)

    def read_result(self, trial_id: str) -> TrialResult | None:
        return self._cached(self._result, self.folder_sig(trial_id), trial_id, super().read_result)

    def history_sig(self, trial_id: str) -> Any:
        """What tells a changed history: the folder alone for a finished trial or one without a history (creating
        the file changes the folder), else the file's time and size (it is appended to); once per refresh."""
        known = self._hsig.get(trial_id)
        if known is not None and known[0] == self._now:
            return known[1]
        result = self.read_result(trial_id)
        folder = self.folder_sig(trial_id)
        sig: Any = None if folder is None else ("folder", folder)
        if sig is not None and not (result is not None and result.terminal) and self._has_history(trial_id, folder):
            try:
                st = os.stat(f"{self.trials_dir}/{trial_id}/history.jsonl")
                sig = None if self._now - st.st_mtime_ns < RACY_NS else (st.st_mtime_ns, st.st_size)
            except OSError:
                sig = None
        self._hsig[trial_id] = (self._now, sig)
        return sig

    def _has_history(self, trial_id: str, folder: int) -> bool:
        """Whether the trial has a history file, looked at again only when its folder changed."""
        known = self._hfile.get(trial_id)
        if known is None or known[0] != folder:
            known = self._hfile[trial_id] = (folder, os.path.exists(f"{self.trials_dir}/{trial_id}/history.jsonl"))
        return known[1]

    def read_history(self, trial_id: str) -> list[dict[str, Any]]:
        return self._cached(self._history, self.history_sig(trial_id), trial_id, super().read_history)


@dataclass
class Board:
    """One experiment on the dashboard: its incremental store, cached leaderboard rows, Redis (when it answers)."""

    store: LiveStore
    url: str | None = None
    queue: str = dispatch.DEFAULT_QUEUE
    lock: threading.Lock = field(default_factory=threading.Lock)
    rows: dict[str, tuple[Any, dict[str, Any]]] = field(default_factory=dict)
    dispatcher: dispatch.Dispatcher | None = None
    redis_note: str = "not tried yet"
    redis_tried: float = -math.inf
    slow: tuple[float, dict[str, Any]] = (-math.inf, {})

    @functools.cached_property
    def config(self) -> Any:
        """The experiment's config, None when experiment.json holds no readable one."""
        try:
            return experiment_config(self.store)
        except ExperimentError:
            return None

    def stage_order(self, stages: list[str]) -> list[str]:
        """The config's stage order, then any other stage seen, by name."""
        config = self.config
        known = [s.name for s in config.stages] if config is not None else []
        return known + sorted(set(stages) - set(known))

    def distributions(self) -> dict[str, dict[str, Any]]:
        """{dotted parameter: its distribution table} from experiment.json."""
        record = self.store.read_experiment()
        space = record.config.get("space", {}) if record is not None else {}
        return {f"{section}.{key}": d for section, entries in space.items() if isinstance(entries, dict)
                for key, d in entries.items() if isinstance(d, dict)}

    # Redis ---------------------------------------------------------------------------------------------------
    def live(self) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]] | None]:
        """(progress by trial, workers) from Redis; ({}, None) when it does not answer (tried again every few s)."""
        now = time.monotonic()
        if self.dispatcher is None and now - self.redis_tried >= REDIS_RETRY_SECONDS:
            self.redis_tried = now
            self.dispatcher, self.redis_note = live_dispatcher(self.store, self.url, self.queue)
        progress, workers, failed = live_progress(self.dispatcher, self.store.experiment)
        if failed:
            self.dispatcher, self.redis_tried, self.redis_note = None, now, failed
        elif self.dispatcher is not None:
            self.redis_note = f"Redis on queue {self.queue}: live progress and workers"
        return progress or {}, workers

    # rows --------------------------------------------------------------------------------------------------
    def leaderboard_rows(self, progress: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """Every trial's leaderboard row (master.leaderboard.trial_row, in trial id order), recomputed only for the
        trials the last refresh looked at again whose files or live progress changed."""
        store = self.store
        for tid in store.changed:
            live = progress.get(tid)
            key = (store.folder_sig(tid), store.history_sig(tid),
                   live and json.dumps(live, sort_keys=True, default=str))
            hit = self.rows.get(tid)
            if hit is None or hit[0] != key or None in key[:2]:
                row = {k: _finite(v) for k, v in trial_row(store, tid, store.read_spec(tid), live).items()}
                self.rows[tid] = (key, row)
        ids = store.trial_ids()
        if len(self.rows) > len(ids):
            self.rows = {tid: self.rows[tid] for tid in ids}
        return [self.rows[tid][1] for tid in ids]

    def slow_parts(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Findings (quarantine, border flags), flags per parameter and ensembles, recomputed every SLOW_SECONDS."""
        at, parts = self.slow
        if time.monotonic() - at < SLOW_SECONDS:
            return parts
        config, store = self.config, self.store
        findings, flags, quarantined = [], {}, {}
        if config is not None:
            findings = [{"kind": k, "message": m} for k, m in watch_findings(store, config)]
            quarantined = failing_workers(worker_outcomes(store, [r["trial"] for r in rows]), config.watch.fail_streak)
        for stage in store.stage_names():
            record = store.read_stage(stage)
            if record is None:
                continue
            if record.status is StageStatus.COMPLETED or config is None:
                found = list(record.flags or ())
            else:
                live = stage in {s.name for s in config.stages}
                found = [f.to_dict() for f in border_flags(store, config, stage)] if live else []
            for flag in found:
                flags.setdefault(flag.get("name"), []).append({**flag, "stage": stage})
        ensembles = [{"name": r["name"], "method": r.get("method"), "top": r.get("top"), "ema": r.get("ema"),
                      "trials": r.get("trials"), "scores": r.get("scores")} for r in read_ensembles(store)]
        parts = {"findings": findings, "flags": flags, "ensembles": ensembles,
                 "storage_workers": worker_lines(store, None, rows, quarantined),
                 "quarantined": {w: {"at": at_, "reason": why} for w, (at_, why) in quarantined.items()}}
        self.slow = (time.monotonic(), parts)
        return parts

    def curves(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Learning curves of the running trials and of the best finished runs: one curve per run (a trial promoted
        later is drawn as part of its latest trial's run, from its first epoch), as in the report."""
        runs = chains({r["trial"]: self.store.read_spec(r["trial"]) or {} for r in rows})
        running = [r for r in rows if r["state"] == TrialState.RUNNING.value][:RUNNING_CURVES]
        finished = heapq.nsmallest(TOP_CURVES, (r for r in rows if r["trial"] in runs and r["state"] in TERMINAL
                                                and r["val_acc"] is not None),
                                   key=lambda r: (-r["val_acc"], r["trial"]))
        return [{"trial": r["trial"], "state": r["state"], "stage": r["stage"], "running": i < len(running),
                 **compact_history(run_history(self.store, chain_to(runs, r["trial"])))}
                for i, r in enumerate(running + finished)]

    def state(self, args: dict[str, str]) -> dict[str, Any]:
        """Everything the experiment page shows, with the leaderboard sorted, filtered and cut as ``args`` ask."""
        with self.lock:
            self.store.refresh()
            progress, workers = self.live()
            rows = self.leaderboard_rows(progress)
            slow = self.slow_parts(rows)
            curves = self.curves(rows)
        stages = self.stage_order(sorted({r["stage"] for r in rows}))
        counts = funnel(pd.DataFrame({"stage": [r["stage"] for r in rows], "state": [r["state"] for r in rows]}),
                        stages) if rows else pd.DataFrame()
        return {
            "experiment": self.store.experiment, "time": time.time(), "redis": self.redis_note,
            "connected": self.dispatcher is not None, "total": len(rows),
            "finished": sum(r["state"] in TERMINAL for r in rows),
            "states": list(counts.columns), "funnel": [self.stage_line(s, counts) for s in counts.index],
            "workers": worker_lines(self.store, workers, rows, slow["quarantined"]) if workers is not None
                       else slow["storage_workers"],
            "leaderboard": select_rows(rows, args), "params": param_names(rows), "curves": curves,
            "findings": slow["findings"], "ensembles": slow["ensembles"], "stages": stages,
            "next_stage": self.next_stage_name(),
        }

    def stage_line(self, stage: str, counts: pd.DataFrame) -> dict[str, Any]:
        record = self.store.read_stage(stage)
        return {"stage": stage, "status": record.status.value if record else None,
                "counts": {k: int(v) for k, v in counts.loc[stage].items()}, "total": int(counts.loc[stage].sum())}

    def next_stage_name(self) -> str | None:
        """The config's first stage not launched yet, if the one before it is recorded."""
        config = self.config
        if config is None:
            return None
        for stage in config.stages:
            if self.store.read_stage(stage.name) is None:
                return stage.name
        return None

    def scatter(self) -> dict[str, Any]:
        """Validation accuracy against each sampled parameter, the parameter's scale and its border flags."""
        with self.lock:
            self.store.refresh()
            rows = [r for r in self.leaderboard_rows({}) if r["val_acc"] is not None]
            flags = self.slow_parts(rows)["flags"]
        dists = self.distributions()
        params = []
        for name in param_names(rows):
            d = dists.get(name, {})
            values = [r.get(name) for r in rows]
            categorical = d.get("dist") == "choice" or any(isinstance(v, (str, list, bool, dict)) for v in values)
            params.append({"name": name, "dist": d.get("dist"), "log": d.get("dist") in ("loguniform", "logint"),
                           "categorical": categorical, "flags": flags.get(name, []),
                           "values": [json.dumps(v) if categorical else _finite(v) for v in values]})
        return {"trial": [r["trial"] for r in rows], "stage": [r["stage"] for r in rows],
                "state": [r["state"] for r in rows], "val_acc": [r["val_acc"] for r in rows], "params": params}

    def trial(self, trial_id: str) -> dict[str, Any]:
        """A trial's page: spec, result, events, per-epoch history, loss trace, babysitting records, checkpoints."""
        store = self.store
        spec = store.read_spec(trial_id) if NAME_RE.match(trial_id) else None
        if spec is None:
            abort(404, description=f"trial {trial_id}: not in experiment {store.experiment}")
        result = ExperimentStore.read_result(store, trial_id)
        history = ExperimentStore.read_history(store, trial_id)
        progress, _ = self.live()
        return {
            "experiment": store.experiment, "trial": trial_id, "spec": spec, "live": progress.get(trial_id),
            "result": result.to_dict() if result else None, "events": store.read_events(trial_id),
            "history": [{k: v for k, v in r.items() if k not in ("loss_trace", "babysit")} for r in history],
            "loss_trace": [p for r in history for p in r.get("loss_trace") or []],
            "babysit": [{"epoch": r["epoch"], **r["babysit"]} for r in history if isinstance(r.get("babysit"), dict)],
            "checkpoints": [{"file": c.path.name, "epoch": c.epoch, "val_acc": c.val_acc,
                             "bytes": c.path.stat().st_size if c.path.exists() else None}
                            for c in store.checkpoints(trial_id)],
        }


TERMINAL = {s.value for s in TrialState if s.terminal}


def compact_history(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-epoch curves of a history: {"epoch": [...], "val_acc": [...], ...} (None where missing)."""
    return {"epoch": [r["epoch"] for r in history],
            **{k: [_finite(r.get(k)) if isinstance(r.get(k), (int, float)) else None for r in history]
               for k in CURVE_KEYS}}


def param_names(rows: list[dict[str, Any]]) -> list[str]:
    names: dict[str, None] = {}
    for row in rows[:200]:
        names.update(dict.fromkeys(k for k in row if k not in BASE_COLUMNS))
    return sorted(names)


def select_rows(rows: list[dict[str, Any]], args: dict[str, str]) -> dict[str, Any]:
    """The leaderboard rows of ``args``' stage and state, sorted by ``sort`` (``order`` asc|desc; missing values
    last, ties by trial id), cut to ``limit``."""
    stage, state, sort = args.get("stage") or None, args.get("state") or None, args.get("sort") or "val_acc"
    descending = (args.get("order") or ("desc" if sort == "val_acc" else "asc")) == "desc"
    try:
        limit = max(1, min(MAX_ROWS, int(args.get("limit") or 100)))
    except ValueError:
        abort(400, description=f"limit: expected a number, got {args.get('limit')!r}")
    chosen = [r for r in rows if (stage is None or r["stage"] == stage) and (state is None or r["state"] == state)]
    present = [r for r in chosen if r.get(sort) is not None]  # rows come in trial order
    try:
        present.sort(key=lambda r: r[sort], reverse=descending)
    except TypeError:  # mixed kinds (numbers and text, lists)
        present.sort(key=lambda r: sortable(r[sort]), reverse=descending)
    missing = [r for r in chosen if r.get(sort) is None]  # stable sorts: ties stay in trial order
    return {"matching": len(chosen), "sort": sort, "order": "desc" if descending else "asc",
            "rows": (present + missing)[:limit]}


def sortable(value: Any) -> tuple[int, Any]:
    """Numbers before text; lists and tables compared as their JSON."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return 0, value
    return 1, value if isinstance(value, str) else json.dumps(value)


def worker_lines(store: LiveStore, workers: list[dict[str, Any]] | None, rows: list[dict[str, Any]],
                 quarantined: dict[str, Any]) -> list[dict[str, Any]]:
    """Workers from Redis (alive, busy with which trial, last heartbeat), else those storage names as having run
    trials (busy: a trial it runs; last seen: its latest record); each marked quarantined or not."""
    if workers is not None:
        return [{"name": w["name"], "alive": True, "state": w["state"], "trial": w["trial_id"],
                 "experiment": w["experiment"], "last_heartbeat": w["last_heartbeat"], "source": "redis",
                 "quarantined": w["name"] in quarantined} for w in workers]
    seen: dict[str, dict[str, Any]] = {}
    for row in rows:
        result = store.read_result(row["trial"])
        if result is None or not result.worker:
            continue
        line = seen.setdefault(result.worker, {"name": result.worker, "alive": None, "state": None, "trial": None,
                                               "experiment": store.experiment, "last_heartbeat": None,
                                               "source": "storage", "quarantined": result.worker in quarantined})
        line["last_heartbeat"] = max(line["last_heartbeat"] or 0, result.updated_at or 0) or None
        if result.state is TrialState.RUNNING:
            line["trial"], line["state"] = row["trial"], "busy"
    return sorted(seen.values(), key=lambda w: w["name"])


class Dashboard:
    """The experiments a dashboard shows (one, or every one under the storage root), each opened on first use."""

    def __init__(self, storage: str | os.PathLike[str] | None, experiment: str | None, url: str | None,
                 queue: str):
        self.root = storage_root(storage)
        if not self.root.is_dir():
            raise DashboardError(f"storage {self.root}: not a directory")
        if experiment is not None and experiment not in list_experiments(self.root):
            known = ", ".join(list_experiments(self.root)) or "none"
            raise DashboardError(f"experiment {experiment}: not found in {self.root} (experiments there: {known})")
        self.only, self.url, self.queue = experiment, url, queue
        self.boards: dict[str, Board] = {}
        self.lock = threading.Lock()

    def names(self) -> list[str]:
        return [self.only] if self.only else list_experiments(self.root)

    def board(self, name: str) -> Board:
        if name not in self.names():
            abort(404, description=f"experiment {name}: not shown here (experiments: {', '.join(self.names())})")
        with self.lock:
            if name not in self.boards:
                self.boards[name] = Board(LiveStore(self.root, name), self.url, self.queue)
            return self.boards[name]

    def summary(self) -> list[dict[str, Any]]:
        """Every experiment shown: trials, finished, running and the best validation accuracy."""
        out = []
        for name in self.names():
            board = self.board(name)
            with board.lock:
                board.store.refresh()
                rows = board.leaderboard_rows({})
            scored = [r["val_acc"] for r in rows if r["val_acc"] is not None]
            out.append({"name": name, "trials": len(rows), "finished": sum(r["state"] in TERMINAL for r in rows),
                        "running": sum(r["state"] == TrialState.RUNNING.value for r in rows),
                        "best": max(scored, default=None)})
        return out


def create_app(dashboard: Dashboard, token: str | None = None, refresh: float = 2.0) -> Flask:
    """The Flask app: pages (one HTML shell and its JS), JSON endpoints, and actions when ``token`` is set."""
    app = Flask(__name__, static_folder=str(STATIC), static_url_path="/static")
    app.json.sort_keys = False

    def page() -> Any:
        return send_from_directory(STATIC, "dashboard.html", max_age=0)

    @app.get("/")
    def index() -> Any:
        return redirect(f"/e/{dashboard.only}") if dashboard.only else page()

    app.add_url_rule("/e/<experiment>", "experiment_page", lambda experiment: page())
    app.add_url_rule("/e/<experiment>/trials/<trial>", "trial_page", lambda experiment, trial: page())

    @app.get("/favicon.ico")
    def favicon() -> Any:
        return "", 204

    @app.get("/api/config")
    def config() -> Any:
        return jsonify({"refresh_ms": int(refresh * 1000), "actions": token is not None, "only": dashboard.only})

    @app.get("/api/experiments")
    def experiments() -> Any:
        return jsonify(dashboard.summary())

    @app.get("/api/e/<experiment>/state")
    def state(experiment: str) -> Any:
        return jsonify(dashboard.board(experiment).state(request.args.to_dict()))

    @app.get("/api/e/<experiment>/scatter")
    def scatter(experiment: str) -> Any:
        return jsonify(dashboard.board(experiment).scatter())

    @app.get("/api/e/<experiment>/trials/<trial>")
    def trial(experiment: str, trial: str) -> Any:
        return jsonify(dashboard.board(experiment).trial(trial))

    def authorize() -> None:
        if token is None:
            abort(403, description="read-only dashboard: start master serve with --allow-actions to act")
        given = request.headers.get(TOKEN_HEADER, "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            abort(403, description=f"missing or wrong action token (header {TOKEN_HEADER})")

    @app.post("/api/e/<experiment>/trials/<trial>/kill")
    def kill(experiment: str, trial: str) -> Any:
        authorize()
        board = dashboard.board(experiment)
        reason = str((request.get_json(silent=True) or {}).get("reason") or "stopped by user (dashboard)")
        try:
            fresh = ExperimentStore(board.store.root, experiment)  # waits for the outcome: reads past the cache
            killed = kill_trial(fresh, trial, reason, board.url, board.queue)
        except (ExperimentError, dispatch.DispatchError, dispatch.RedisError) as exc:
            abort(409, description=str(exc))
        result = killed.result
        return jsonify({"trial": trial, "state": result.state.value if result else None,
                        "reason": result.reason if result else reason, "forced": killed.forced})

    @app.post("/api/e/<experiment>/stages/<stage>/launch")
    def launch_stage(experiment: str, stage: str) -> Any:
        authorize()
        board = dashboard.board(experiment)
        record = board.store.read_experiment()
        url = dispatch.redis_url(board.url)
        if board.config is None or record is None:
            abort(409, description=f"experiment {experiment}: experiment.json holds no readable config")
        if url is None:
            abort(409, description="launching from the dashboard needs a cluster Redis (master serve --url URL) "
                                   "with workers; on one machine, run master launch --stage " + stage)
        setup = Launch(board.config, record.config_text, ExperimentStore(board.store.root, experiment), url,
                       board.queue)
        try:
            code = launch(setup, [stage], wait=False, reporter=Reporter())
        except (LaunchError, ConfigError, dispatch.DispatchError) as exc:
            abort(409, description=str(exc))
        return jsonify({"stage": stage, "exit_code": code})

    @app.errorhandler(400)
    @app.errorhandler(403)
    @app.errorhandler(404)
    @app.errorhandler(409)
    def error(exc: Any) -> Any:
        return jsonify({"error": exc.description}), exc.code

    return app


def new_token() -> str:
    return secrets.token_urlsafe(18)


def serve(storage: str | os.PathLike[str] | None, experiment: str | None, url: str | None, queue: str, host: str,
          port: int, allow_actions: bool, refresh: float = 2.0, say: Callable[[str], None] = print) -> None:
    """Serve the dashboard until Ctrl-C (Flask's WSGI app on werkzeug's threaded server); ``say`` tells the address
    and, with ``allow_actions``, the token that actions need."""
    from werkzeug.serving import make_server

    token = new_token() if allow_actions else None
    app = create_app(Dashboard(storage, experiment, url, queue), token, refresh)
    try:  # bound here, not by werkzeug, which exits the process when the port is taken
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.create_server((host, port), family=family) as listening:
            server = make_server(host, port, app, threaded=True, fd=listening.fileno())
    except OSError as exc:
        raise DashboardError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    address = f"http://{host if ':' not in host else f'[{host}]'}:{server.port}/"
    say(f"dashboard of {experiment or 'every experiment in ' + str(storage_root(storage))} at {address} "
        f"({'actions allowed with the token below' if token else 'read-only'}); Ctrl-C stops it")
    if token:
        say(f"action token: {token}\nopen {address}?token={token} to kill trials and launch stages from the page")
    if host not in ("127.0.0.1", "localhost", "::1"):
        say(f"warning: listening on {host}, not only on this machine; anyone who reaches it sees the experiments")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        say("dashboard stopped")
    finally:
        server.server_close()
