"""The experiment report: leaderboard files (CSV, JSON) and a self-contained HTML page of plots, from shared storage."""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from master.borders import BorderFlag
from master.ensemble import read_ensembles
from master.leaderboard import build_leaderboard, collapse_runs, funnel, param_columns
from master.lineage import chain_to, chains, run_history
from worker.states import TrialState
from worker.store import ExperimentStore, atomic_write_bytes

log = logging.getLogger(__name__)

HTML_ROWS = 100  # leaderboard rows on the page; the files hold every trial
LOG_DISTS = ("loguniform", "logint")
RATIO_GUIDE = 1e-3  # cs231n: updates about a thousandth of the weights
STAGE_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
FLAG_COLOR = "#d62728"
STATE_COLORS = {TrialState.COMPLETED.value: "#2ca02c", TrialState.KILLED.value: "#ff9f1c",
                TrialState.DIVERGED.value: "#d62728", TrialState.FAILED.value: "#7f1d1d",
                TrialState.RUNNING.value: "#1f77b4", TrialState.QUEUED.value: "#b0b0b0"}
DPI = 96
ZOOM_QUANTILE = 25  # the scatter's y-axis starts at this percentile of the scores: the band where decisions are


@dataclass
class Context:
    """What the page needs besides the leaderboard: stage order, sampled distributions, ranges, flags."""

    stages: list[str]
    dists: dict[str, dict[str, Any]]
    ranges: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # stage -> param -> range
    flags: dict[str, list[BorderFlag]] = field(default_factory=dict)  # stage -> border flags
    flag_messages: list[str] = field(default_factory=list)  # "<stage>: <what the flag says>"

    def color(self, stage: str) -> str:
        return STAGE_COLORS[self.stages.index(stage) % len(STAGE_COLORS)] if stage in self.stages else "#444444"

    def log_scale(self, param: str) -> bool:
        found = [self.dists.get(param)] + [r.get(param) for r in self.ranges.values()]
        return any(isinstance(d, dict) and d.get("dist") in LOG_DISTS for d in found)


def _table(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _border_flags(path: Path, entries: Any) -> list[BorderFlag]:
    """The border flags recorded in a stage file; malformed entries are skipped with a warning naming it."""
    flags = []
    for entry in entries:
        try:
            flags.append(BorderFlag(**entry))
        except TypeError:
            log.warning("skipping a malformed border flag in %s: %r", path, entry)
    return flags


def read_context(store: ExperimentStore, df: pd.DataFrame) -> Context:
    """Search space from experiment.json, per-stage ranges and border flags from stages/*.json, and the stage
    order: by launch time (the stage record's created_at), then epoch budget, then name (experiment.json is
    written with sorted keys, so the config's own stage order is not on disk)."""
    experiment = store.read_experiment()
    config = experiment.config if experiment is not None else {}
    budgets = {name: _table(stage).get("epochs") for name, stage in _table(config.get("stages")).items()}
    dists = {f"{section}.{key}": spec for section, entries in _table(config.get("space")).items()
             for key, spec in _table(entries).items()}
    ctx = Context([], dists)
    launched = {}
    for stage in store.stage_names():
        record = store.read_stage(stage)  # None (with a warning naming the file) when unreadable
        if record is None:
            continue
        launched[stage] = record.created_at or "~"
        ctx.ranges[stage] = {k: v for k, v in record.ranges.items() if isinstance(v, dict)}
        ctx.flags[stage] = _border_flags(store.stage_path(stage), record.flags or ())
        ctx.flag_messages += [f"{stage}: {m}" for m in record.flag_messages]
    names = set(budgets) | set(launched) | set(df["stage"])
    epochs = {n: budgets[n] if isinstance(budgets.get(n), (int, float)) else math.inf for n in names}
    ctx.stages = sorted(names, key=lambda n: (launched.get(n, "~"), epochs[n], n))
    return ctx


def warn_foreign(store: ExperimentStore) -> None:
    """Warn about every entry of trials/ that is not a trial (no spec.json); corrupt files warn where read."""
    if not store.trials_dir.is_dir():
        return
    trials = set(store.trial_ids())
    for path in sorted(store.trials_dir.iterdir()):
        if path.name not in trials:
            log.warning("skipping %s: not a trial (no spec.json)", path)


def numeric_params(df: pd.DataFrame) -> list[str]:
    """Hyperparameter columns holding numbers (not lists, strings or booleans) for at least one trial."""
    return [c for c in param_columns(df) if pd.api.types.is_numeric_dtype(df[c])
            and not pd.api.types.is_bool_dtype(df[c]) and df[c].notna().any()]


def choice_params(df: pd.DataFrame, ctx: Context) -> list[str]:
    """Hyperparameter columns sampled as a choice, or holding something other than numbers (lists, strings)."""
    numeric = numeric_params(df)
    return [c for c in param_columns(df) if df[c].notna().any()
            and (c not in numeric or _table(ctx.dists.get(c)).get("dist") == "choice")]


# files -----------------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    """Lists and tables (e.g. model.hidden) as JSON text for the CSV file."""
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else value


def with_gap(df: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard with gap = train_acc - val_acc after train_acc (large: overfitting)."""
    out = df.copy()
    out.insert(out.columns.get_loc("train_acc") + 1, "gap", out["train_acc"] - out["val_acc"])
    return out


def write_tables(df: pd.DataFrame, directory: Path) -> tuple[Path, Path]:
    """leaderboard.csv (lists as JSON text) and leaderboard.json (one object per trial), written atomically."""
    csv_path, json_path = directory / "leaderboard.csv", directory / "leaderboard.json"
    flat = df.copy()
    for column in flat.columns[flat.dtypes == object]:
        flat[column] = flat[column].map(_jsonable)
    atomic_write_bytes(csv_path, flat.to_csv(index=False).encode())
    atomic_write_bytes(json_path, df.to_json(orient="records", indent=1, double_precision=10).encode())
    return csv_path, json_path


# figures ---------------------------------------------------------------------------------------------
def _png(fig: Figure) -> str:
    """The figure as a base64 PNG data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _grid(n: int, ncols: int, width: float, height: float) -> tuple[Figure, list[Any]]:
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def scatter_figure(df: pd.DataFrame, params: list[str], ctx: Context) -> Figure:
    """Validation accuracy against each numeric hyperparameter, one colour per stage, with each stage's
    range borders (dashed) and flagged borders (thick red)."""
    fig, axes = _grid(len(params), 3, 4.4, 3.4)
    scored = df[df["val_acc"].notna()]
    groups = dict(tuple(scored.groupby("stage", sort=False)))
    low, high = zoom_band(scored["val_acc"])
    for ax, param in zip(axes, params):
        for stage in ctx.stages:
            sub = groups.get(stage)
            if sub is not None and sub[param].notna().any():
                inside = sub[sub["val_acc"] >= low]
                ax.scatter(inside[param], inside["val_acc"], s=14, alpha=0.65, color=ctx.color(stage), label=stage,
                           edgecolors="none")
                below = sub.loc[sub["val_acc"] < low, param]  # drawn on the bottom edge, as the full range's note
                ax.scatter(below, np.full(len(below), low), s=16, marker="v", color=ctx.color(stage), alpha=0.5,
                           edgecolors="none", clip_on=False)
        borders = {stage: r[param] for stage, r in ctx.ranges.items() if param in r} or {"": ctx.dists.get(param)}
        for stage, rng in borders.items():  # the config's range (grey) where no stage recorded its own
            if isinstance(rng, dict) and all(isinstance(rng.get(k), (int, float)) for k in ("low", "high")):
                for value in (rng["low"], rng["high"]):
                    ax.axvline(value, color=ctx.color(stage) if stage else "#888888", ls="--", lw=1, alpha=0.8)
        flagged: dict[float, list[str]] = {}  # one label per flagged border, naming every stage that flagged it
        for stage, flags in ctx.flags.items():
            for flag in flags:
                if flag.name == param:
                    flagged.setdefault(flag.low if flag.side == "lower" else flag.high, []).append(stage)
        for value, stages in flagged.items():
            ax.axvline(value, color=FLAG_COLOR, lw=3, alpha=0.85)
            ax.annotate(f"flagged ({', '.join(stages)})", (value, 1.0), xycoords=("data", "axes fraction"),
                        color=FLAG_COLOR, fontsize=8, ha="center", va="bottom")
        if ctx.log_scale(param):
            ax.set_xscale("log")
        ax.set_xlabel(param + (" (log)" if ctx.log_scale(param) else ""))
        ax.set_ylabel("best val accuracy")
        ax.set_ylim(low, high)
        ax.grid(alpha=0.3)
    if axes:
        legend = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
        handles, labels = list(legend.values()), list(legend)
        if any(ctx.flags.values()):
            handles.append(axes[0].axvline(np.nan, color=FLAG_COLOR, lw=3))
            labels.append("flagged border")
        handles.append(axes[0].axvline(np.nan, color="#888888", ls="--", lw=1))
        labels.append("range border (stage colour)")
        fig.legend(handles, labels, loc="outside upper center", ncols=min(len(labels), 6), frameon=False)
    return fig


def zoom_band(scores: pd.Series) -> tuple[float, float]:
    """The y-range where decisions are: from the scores' ZOOM_QUANTILE percentile to the best, padded a little."""
    values = scores.dropna().to_numpy(dtype=float)
    if not len(values):
        return 0.0, 1.0
    low, high = float(np.percentile(values, ZOOM_QUANTILE)), float(values.max())
    pad = max(0.05 * (high - low), 0.005)
    return max(0.0, low - pad), min(1.0, high + pad) if high + pad > low else low + 0.01


def _category(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def choice_figure(df: pd.DataFrame, param: str, ctx: Context) -> Figure:
    """A strip plot of best validation accuracy per value of the choice ``param`` (only the trials it applied
    to), one colour per stage, a black bar at each value's median; values in the sampled order."""
    fig = Figure(figsize=(4.6, 3.4), layout="constrained")
    ax = fig.subplots()
    scored = df[df["val_acc"].notna() & df[param].notna()]
    listed = [_category(v) for v in _table(ctx.dists.get(param)).get("values", [])]
    seen = [_category(v) for v in scored[param]]
    categories = listed + sorted(set(seen) - set(listed))
    jitter = np.random.default_rng(0).uniform(-0.18, 0.18, len(scored))
    x = np.array([categories.index(c) for c in seen], dtype=float)
    for stage in ctx.stages:
        mask = (scored["stage"] == stage).to_numpy()
        if mask.any():
            ax.scatter(x[mask] + jitter[mask], scored["val_acc"].to_numpy()[mask], s=16, alpha=0.7,
                       color=ctx.color(stage), label=stage, edgecolors="none")
    for i, category in enumerate(categories):
        values = scored["val_acc"].to_numpy()[x == i]
        if len(values):
            ax.hlines(np.median(values), i - 0.3, i + 0.3, color="black", lw=2)
    ax.set_xticks(range(len(categories)), categories, rotation=20 if max(map(len, categories), default=0) > 8 else 0)
    ax.set(xlabel=param, ylabel="best val accuracy", title=f"{param} ({len(scored)} trials it applied to)")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3, axis="y")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    return fig


def curves_figure(histories: dict[str, list[dict[str, Any]]]) -> Figure:
    """Loss and accuracy per epoch of the top trials: solid train, dashed validation, dots the sub-epoch validation
    scores of epochs trained with ``val_points``."""
    fig = Figure(figsize=(12, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    dotted = False
    for i, (trial, history) in enumerate(histories.items()):
        color = STAGE_COLORS[i % len(STAGE_COLORS)]
        epochs = [r["epoch"] for r in history]
        for ax, key in ((loss_ax, "loss"), (acc_ax, "acc")):
            ax.plot(epochs, [r.get(f"train_{key}", np.nan) for r in history], color=color, lw=1.6, label=trial)
            ax.plot(epochs, [r.get(f"val_{key}", np.nan) for r in history], color=color, lw=1.6, ls="--")
        points = [p for r in history for p in r.get("val_points") or () if isinstance(p, list) and len(p) == 2]
        if points:
            dotted = True
            acc_ax.plot(*zip(*points), color=color, ls="none", marker="o", ms=2.5, alpha=0.7)
    loss_ax.set(xlabel="epoch", ylabel="loss", yscale="log", title="loss (solid: train, dashed: val)")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy (solid: train, dashed: val"
               + (", dots: val subset within epochs)" if dotted else ")"))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    acc_ax.legend(fontsize=8, loc="lower right")
    return fig


def ratio_figure(histories: dict[str, list[dict[str, Any]]]) -> Figure | None:
    """Update/weight ratio per layer and epoch, one panel per top trial, with the 1e-3 guide line."""
    ratios = {t: pd.DataFrame([r["update_ratio"] for r in h if isinstance(r.get("update_ratio"), dict)],
                              index=[r["epoch"] for r in h if isinstance(r.get("update_ratio"), dict)])
              for t, h in histories.items()}
    ratios = {t: r for t, r in ratios.items() if not r.empty}
    if not ratios:
        return None
    fig, axes = _grid(len(ratios), 3, 4.2, 3.0)
    for ax, (trial, frame) in zip(axes, ratios.items()):
        for layer in frame.columns:
            ax.plot(frame.index, frame[layer].where(frame[layer] > 0), marker=".", lw=1.4, label=layer)
        ax.axhline(RATIO_GUIDE, color="#555555", ls="--", lw=1)
        ax.text(1.0, RATIO_GUIDE, " 1e-3", transform=ax.get_yaxis_transform(), va="center", fontsize=8)
        ax.set_yscale("log")
        ax.set(title=trial, xlabel="epoch", ylabel="update / weight")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def funnel_figure(counts: pd.DataFrame) -> Figure:
    """Horizontal stacked bars: one per stage, segments per state, the first stage on top."""
    fig = Figure(figsize=(10, 0.7 + 0.55 * len(counts)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(counts))[::-1]
    left = np.zeros(len(counts))
    for state in counts.columns:
        widths = counts[state].to_numpy(dtype=float)
        ax.barh(y, widths, left=left, color=STATE_COLORS.get(state, "#999999"), label=state.lower(), height=0.6)
        for yi, x0, w in zip(y, left, widths):
            if w and w >= 0.04 * counts.to_numpy().sum(axis=1).max():
                ax.text(x0 + w / 2, yi, str(int(w)), ha="center", va="center", fontsize=8, color="white")
        left += widths
    for yi, total in zip(y, left):
        ax.text(total, yi, f"  {int(total)}", va="center", fontsize=9)
    ax.set_yticks(y, counts.index)
    ax.set_xlabel("trials")
    ax.spines[["top", "right"]].set_visible(False)
    fig.legend(loc="outside right upper", frameon=False)
    return fig


# page ------------------------------------------------------------------------------------------------
def _fmt(column: str, value: Any) -> str:
    """A leaderboard cell as escaped HTML."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if column == "state":
        return f'<span class="state {html.escape(str(value).lower())}">{html.escape(str(value))}</span>'
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value)
    elif isinstance(value, float):
        text = f"{value:.4f}" if column in ("val_acc", "train_acc", "gap", "test_acc") \
            else f"{value:.1f}" if column == "seconds" \
            else f"{value:.4g}"
    else:
        text = str(value)
    return html.escape(text)


def page_columns(df: pd.DataFrame) -> list[str]:
    """The page's column order: who, the accuracies, the hyperparameters, then epochs, time, lineage, why, where."""
    first = [c for c in ("trial", "stages", "state", "val_acc", "train_acc", "gap", "test_acc") if c in df.columns]
    params = param_columns(df.drop(columns=["gap", "test_acc"], errors="ignore"))
    return first + params + [c for c in df.columns if c not in first and c not in params and c != "stage"]


def leaderboard_html(df: pd.DataFrame) -> str:
    shown = df.head(HTML_ROWS)[page_columns(df)].copy()
    shown.insert(0, "#", range(1, len(shown) + 1))
    formatters = {c: (lambda v, c=c: _fmt(c, v)) for c in shown.columns}
    return shown.to_html(index=False, escape=False, formatters=formatters, classes="board", border=0, na_rep="\u2013")


def _acc(value: Any, sign: str = "") -> str:
    return f"{value:{sign}.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def ensembles_html(records: list[dict[str, Any]]) -> str:
    """One row per recorded ensemble: method, members, validation and test accuracy, gain over the best single."""
    rows = []
    for r in records:
        val, test = r["scores"].get("val") or {}, r["scores"].get("test") or {}
        rows.append({
            "ensemble": r.get("name"), "method": r.get("method"), "ema": r.get("ema"),
            "members": sum(1 for m in r["members"] if isinstance(m, dict) and m.get("weight")),
            "val acc": _acc(val.get("ensemble")), "test acc": _acc(test.get("ensemble")),
            "best single": r.get("best_single"), "its test acc": _acc(test.get("best_single")),
            "test gain": _acc(test.get("gain"), "+"), "trials": ", ".join(map(str, r.get("trials") or [])),
        })
    return pd.DataFrame(rows).to_html(index=False, classes="board", border=0)


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2329; margin: 0;
       background: #f4f6f8; }
header { background: #1d2b3a; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 0; color: #c5d0db; }
main { padding: 8px 32px 40px; max-width: 1400px; }
section { background: #fff; border-radius: 6px; box-shadow: 0 1px 3px rgba(0,0,0,.08); margin: 18px 0;
          padding: 14px 20px; overflow-x: auto; }
h2 { font-size: 17px; margin: 4px 0 10px; }
.note { color: #5b6672; font-size: 13px; }
.cards { display: flex; gap: 14px; flex-wrap: wrap; }
.card { background: #fff; border-radius: 6px; box-shadow: 0 1px 3px rgba(0,0,0,.08); padding: 10px 18px; }
.card b { display: block; font-size: 20px; }
img { max-width: 100%; height: auto; }
img[id^="choice-"] { width: 32%; min-width: 300px; margin: 2px; }
table.board { border-collapse: collapse; font-size: 12.5px; white-space: nowrap; }
table.board th { background: #eef1f4; text-align: right; padding: 5px 8px; position: sticky; top: 0; }
table.board td { padding: 4px 8px; text-align: right; border-top: 1px solid #e6e9ed; }
table.board tr:hover td { background: #f7f9fb; }
.state { border-radius: 3px; padding: 1px 6px; color: #fff; font-size: 11px; }
""" + "".join(f".state.{state.lower()} {{ background: {color}; }}\n" for state, color in STATE_COLORS.items())


def _figure_section(title: str, figure_id: str, fig: Figure | None, note: str = "", empty: str = "") -> str:
    if fig is None:
        return f'<section id="{figure_id}"><h2>{title}</h2><p class="note">{empty}</p></section>'
    return (f'<section id="{figure_id}"><h2>{title}</h2>' + (f'<p class="note">{note}</p>' if note else "")
            + f'<img id="{figure_id}-plot" alt="{html.escape(title)}" src="{_png(fig)}"></section>')


def test_accuracies(store: ExperimentStore, trials: list[str]) -> dict[str, float]:
    """Test-split accuracy of each trial's best checkpoint, where the trial's data has a test split."""
    from master.ensemble import accuracy, readable_members

    out = {}
    for trial in trials:
        for member in readable_members(store, trial, ema=False, limit=1):
            if len(member.data.y_test):
                out[trial] = accuracy(member.proba(member.data.x_test), member.data.y_test)
    return out


def choice_sections(df: pd.DataFrame, ctx: Context) -> str:
    """One strip plot per choice parameter, side by side."""
    params = choice_params(df, ctx)
    if not params:
        return ""
    images = "".join(f'<img id="choice-{html.escape(p.replace(".", "-"))}-plot" '
                     f'alt="best val accuracy by {html.escape(p)}" src="{_png(choice_figure(df, p, ctx))}">'
                     for p in params)
    return ('<section id="choices"><h2>Validation accuracy by each choice</h2><p class="note">Each dot is a trial '
            "the parameter applied to (jittered sideways), one colour per stage; the black bar is the median."
            f"</p>{images}</section>")


def render_page(store: ExperimentStore, df: pd.DataFrame, ctx: Context, curves: int,
                ensembles: list[dict[str, Any]]) -> str:
    """The whole self-contained page (figures embedded as base64 PNG); the leaderboard has one row per run."""
    counts = funnel(df, ctx.stages)
    params = [p for p in numeric_params(df) if _table(ctx.dists.get(p)).get("dist") != "choice"]
    runs = collapse_runs(store, df) if len(df) else df.assign(stages=[], lineage=[])
    top = list(runs[runs["val_acc"].notna()].head(curves)["trial"])
    lineage, labels = chains(dict(store.iter_trials())), dict(zip(runs["trial"], runs["lineage"]))
    by_trial = {t: h for t in top if (h := run_history(store, chain_to(lineage, t)))}
    histories = {labels.get(t) or t: h for t, h in by_trial.items()}  # a promoted run labelled by its lineage
    tested = test_accuracies(store, top)
    board = with_gap(runs)
    if tested:
        board.insert(board.columns.get_loc("gap") + 1, "test_acc", board["trial"].map(tested))
    low, _ = zoom_band(df["val_acc"])
    best = df.iloc[0] if len(df) and pd.notna(df["val_acc"].iloc[0]) else None
    cards = [("trials", len(df)), ("stages", len(counts)),
             ("finished", int(df["state"].isin([s.value for s in TrialState if s.terminal]).sum())),
             ("best val accuracy", f"{best['val_acc']:.4f} ({html.escape(best['trial'])})" if best is not None
              else "–")]
    parts = [
        '<section id="summary" class="cards">'
        + "".join(f'<div class="card">{k}<b>{v}</b></div>' for k, v in cards) + "</section>",
        _figure_section("Trials per stage and state", "funnel", funnel_figure(counts) if len(counts) else None,
                        empty="no trials yet"),
        f'<section id="leaderboard"><h2>Leaderboard</h2><p class="note">Top {min(HTML_ROWS, len(runs))} of '
        f"{len(runs)} runs by best validation accuracy (a run is a trial and the trials promoted from it: its "
        f"latest trial, the stages it went through and its lineage); train_acc is at the best epoch, gap = "
        f"train_acc − val_acc (large: overfitting, about zero: room for a bigger model)"
        + (f"; test_acc is the best checkpoint's on the test split, for the top {len(tested)}" if tested else "")
        + f". Every trial is in leaderboard.csv and leaderboard.json beside this page.</p>"
        f"{leaderboard_html(board)}</section>",
        _figure_section("Validation accuracy against each hyperparameter", "hyperparameters",
                        scatter_figure(df, params, ctx) if params else None,
                        note="One colour per stage; dashed lines are each stage's range borders, log axes where "
                             "the parameter was sampled log-uniformly. The y-axis shows the top band (from "
                             f"{low:.3f}); triangles on the bottom edge are trials below it (the full range is "
                             "in leaderboard.csv and in the per-choice plots below). Each parameter shows only the "
                             "trials it applied to."
                             + "".join(f"<br>Flagged: {html.escape(m)}" for m in ctx.flag_messages),
                        empty="no numeric hyperparameter sampled"),
        choice_sections(df, ctx),
        _figure_section(f"Learning curves of the top {len(histories)} runs (promoted runs: their whole history)",
                        "curves",
                        curves_figure(histories) if histories else None,
                        note="Training loss is the minibatch average with dropout and the L2 penalty included; "
                             "training accuracy is measured in test mode on a fixed training subsample.",
                        empty="no trial has a history yet"),
        _figure_section("Update / weight ratio per layer", "ratios", ratio_figure(histories),
                        note="Ratio of the last update's norm to the weights' norm each epoch; around 1e-3 is "
                             "healthy, far above means a learning rate too high, far below too low.",
                        empty="no update ratios recorded"),
    ]
    if ensembles:
        parts.append(f'<section id="ensembles"><h2>Ensembles</h2><p class="note">Softmax averages of the best '
                     f"trials' checkpoints; the gain is over the member with the best validation accuracy."
                     f"</p>{ensembles_html(ensembles)}</section>")
    from master.babysit import TOP, sections_html  # it draws with this module's helpers

    parts.append(sections_html(store, dict(list(by_trial.items())[:TOP])))
    return page_html(store, store.experiment, parts)


def page_html(store: ExperimentStore, title: str, parts: list[str]) -> str:
    """A self-contained page: header with `title`, then the HTML `parts`."""
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)} – hypersearch report</title><style>{CSS}</style></head>"
            f"<body><header><h1>{html.escape(title)}</h1><p>hypersearch report · "
            f"{html.escape(str(store.dir))} · generated {generated}</p></header><main>"
            + "\n".join(parts) + "</main></body></html>\n")


@dataclass(frozen=True)
class Report:
    """What `master report` produced."""

    leaderboard: pd.DataFrame
    html: Path
    csv: Path
    json: Path


def build_report(store: ExperimentStore, curves: int = 5) -> Report:
    """Read the experiment's storage (no Redis) and write report/index.html, leaderboard.csv and .json."""
    warn_foreign(store)
    df = build_leaderboard(store)
    ctx = read_context(store, df)
    store.report_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = write_tables(with_gap(df), store.report_dir)
    html_path = store.report_dir / "index.html"
    atomic_write_bytes(html_path, render_page(store, df, ctx, curves, read_ensembles(store)).encode())
    return Report(df, html_path, csv_path, json_path)
