"""Babysitting pictures and diagnosis of one trial (cs231n's rules): loss trace, accuracy gap, histograms, weights."""
from __future__ import annotations

import html
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from master.experiment import ExperimentError
from master.report import RATIO_GUIDE, _png, page_html, ratio_figure
from worker.states import TrialState
from worker.store import ExperimentStore, StorageError, atomic_write_bytes

log = logging.getLogger(__name__)

TOP = 3  # trials with babysitting pictures on the experiment's page
LOSS_FLAT = 0.9  # loss at the end above this fraction of the loss at the start: flat from the start
LOSS_EXPLODE = 2.0  # ... above this multiple (or not finite): exploding
GAP_LIMIT = 0.10  # train - val accuracy at the best epoch above this: overfitting
RATIO_FACTOR = 10.0  # update/weight ratio further than this factor from 1e-3: far from it
DEAD_LIMIT = 0.5  # fraction of dead ReLUs in a layer above this: too many
MIN_TRACE = 10  # loss points needed to judge the loss's shape
TILES = 64  # first-layer filters or units shown


# the loss trace ----------------------------------------------------------------------------------
def loss_points(history: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(iterations, minibatch losses) of the trial's loss_trace over all its epochs, in iteration order."""
    pairs = [p for r in history for p in r.get("loss_trace") or () if isinstance(p, (list, tuple)) and len(p) == 2]
    pairs.sort(key=lambda p: p[0])
    points = np.array([[float(i), float(v) if v is not None else math.nan] for i, v in pairs]).reshape(-1, 2)
    return points[:, 0], points[:, 1]


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over `window` points (fewer at the start), same length as `values`."""
    values = np.asarray(values, dtype=float)
    window = max(1, min(int(window), len(values)))
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


def _ends(losses: np.ndarray) -> tuple[float, float]:
    """Median loss of the first and of the last tenth of the trace."""
    k = max(1, len(losses) // 10)
    return float(np.median(losses[:k])), float(np.median(losses[-k:]))


# diagnosis rules: each answers one question with early returns ------------------------------------
def loss_exploded(history: list[dict[str, Any]], state: str | None = None, reason: str = "") -> str | None:
    """Learning rate too high: the trial diverged, or its loss trace is not finite or ends far above its start."""
    if state == TrialState.DIVERGED.value:
        return f"diverged ({reason or 'loss exploded'}): learning rate too high"
    _, losses = loss_points(history)
    if len(losses) and not np.isfinite(losses).all():
        return "non-finite minibatch loss: learning rate too high"
    if len(losses) < MIN_TRACE:
        return None
    start, end = _ends(losses)
    if end > LOSS_EXPLODE * start:
        return f"loss rose from {start:.3g} to {end:.3g}: learning rate too high"
    return None


def loss_flat(history: list[dict[str, Any]]) -> str | None:
    """Learning rate too low: the loss barely moved from the start (but did not explode)."""
    _, losses = loss_points(history)
    if len(losses) < MIN_TRACE or not np.isfinite(losses).all():
        return None
    start, end = _ends(losses)
    if LOSS_FLAT * start < end <= LOSS_EXPLODE * start:
        return f"loss flat from the start ({start:.3g} -> {end:.3g}): learning rate too low"
    return None


def overfitting(history: list[dict[str, Any]]) -> str | None:
    """More regularization: a large train/validation accuracy gap at the best epoch."""
    scored = [r for r in history if isinstance(r.get("val_acc"), (int, float)) and isinstance(r.get("train_acc"),
                                                                                             (int, float))]
    if not scored:
        return None
    best = max(scored, key=lambda r: r["val_acc"])
    gap = best["train_acc"] - best["val_acc"]
    if gap > GAP_LIMIT:
        return (f"train/val accuracy gap {gap:.2f} at epoch {best['epoch']}: overfitting, more regularization "
                f"(reg, dropout) or more data")
    return None


def ratio_off(history: list[dict[str, Any]]) -> str | None:
    """Update/weight ratios far from 1e-3 (the median over epochs, per layer): learning rate too low or high."""
    per_layer: dict[str, list[float]] = {}
    for record in history:
        for layer, ratio in (record.get("update_ratio") or {}).items():
            if isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0:
                per_layer.setdefault(layer, []).append(float(ratio))
    medians = {layer: float(np.median(r)) for layer, r in per_layer.items()}
    low = [f"{layer} {m:.1e}" for layer, m in medians.items() if m < RATIO_GUIDE / RATIO_FACTOR]
    high = [f"{layer} {m:.1e}" for layer, m in medians.items() if m > RATIO_GUIDE * RATIO_FACTOR]
    if not low and not high:
        return None
    parts = ([f"below ({', '.join(low)}): learning rate too low there"] if low else []) \
        + ([f"above ({', '.join(high)}): learning rate too high there"] if high else [])
    return "update/weight far from 1e-3, " + "; ".join(parts)


def dead_relus(history: list[dict[str, Any]]) -> str | None:
    """More than half of a layer's ReLUs dead in the last babysitting snapshot."""
    snapshots = [r["babysit"] for r in history if isinstance(r.get("babysit"), dict)]
    if not snapshots:
        return None
    dead = {layer: stats.get("dead_fraction") for layer, stats in (snapshots[-1].get("activations") or {}).items()}
    found = [f"{layer} {fraction:.0%}" for layer, fraction in dead.items()
             if isinstance(fraction, (int, float)) and fraction > DEAD_LIMIT]
    if not found:
        return None
    return f"more than half the ReLUs dead ({', '.join(found)}): lower the learning rate or check the initialization"


def diagnose(history: list[dict[str, Any]], state: str | None = None, reason: str = "") -> list[str]:
    """Every warning sign the notes' rules find in a trial's history (empty: none)."""
    found = [loss_exploded(history, state, reason), overfitting(history), ratio_off(history), dead_relus(history)]
    if found[0] is None:
        found.insert(0, loss_flat(history))
    return [f for f in found if f is not None]


# first-layer weights -----------------------------------------------------------------------------
def image_shape(features: int) -> tuple[int, ...] | None:
    """The image a flat input of `features` values is: (side, side) grey, (3, side, side) colour, else None."""
    for channels in (1, 3):
        side = math.isqrt(features // channels)
        if features % channels == 0 and side * side * channels == features and side >= 4:
            return (side, side) if channels == 1 else (3, side, side)
    return None


def _unit_range(tiles: np.ndarray) -> np.ndarray:
    """Each tile scaled to [0, 1] on its own (a constant tile to 0.5)."""
    flat = tiles.reshape(len(tiles), -1)
    lo, hi = flat.min(axis=1), flat.max(axis=1)
    span = np.where(hi > lo, hi - lo, 1.0)
    out = (flat - lo[:, None]) / span[:, None]
    out[hi == lo] = 0.5
    return out.reshape(tiles.shape)


def first_layer_tiles(arrays: dict[str, np.ndarray]) -> tuple[str, np.ndarray] | None:
    """("images", (n, h, w) or (n, h, w, 3) in [0, 1]) for conv2d filters and MLP units on image inputs,
    ("curves", (n, channels, kernel)) for conv1d kernels, or None (no first layer, or inputs not images)."""
    if "param.Wc1" in arrays:
        w = np.asarray(arrays["param.Wc1"], dtype=float)[:TILES]
        if w.ndim == 3:
            return "curves", w
        if w.ndim != 4:
            return None
        if w.shape[1] == 3:
            return "images", _unit_range(w.transpose(0, 2, 3, 1))
        return "images", _unit_range(w[:, 0])  # the first input channel where there are not 1 or 3
    w = arrays.get("param.W1")
    if w is None or w.ndim != 2 or (shape := image_shape(w.shape[0])) is None:
        return None
    tiles = np.asarray(w, dtype=float).T[:TILES].reshape((-1,) + shape)
    return "images", _unit_range(tiles.transpose(0, 2, 3, 1) if len(shape) == 3 else tiles)


# figures -----------------------------------------------------------------------------------------
def loss_figure(history: list[dict[str, Any]]) -> Figure | None:
    """Minibatch loss over iterations, raw and smoothed, log scale."""
    iterations, losses = loss_points(history)
    if not len(losses):
        return None
    fig = Figure(figsize=(6.4, 3.4), layout="constrained")
    ax = fig.subplots()
    shown = np.where(losses > 0, losses, np.nan)
    ax.plot(iterations, shown, color="#9ab7d3", lw=0.8, label="minibatch loss")
    window = max(1, len(losses) // 20)
    ax.plot(iterations, smooth(np.nan_to_num(shown, nan=np.nanmax(shown, initial=1.0)), window), color="#1f4e79",
            lw=2, label=f"moving average ({window} points)")
    ax.set(yscale="log", xlabel="iteration", ylabel="minibatch loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def accuracy_figure(history: list[dict[str, Any]]) -> Figure | None:
    """Train and validation accuracy per epoch, the gap between them shaded."""
    records = [r for r in history if isinstance(r.get("val_acc"), (int, float))]
    if not records:
        return None
    epochs = [r["epoch"] for r in records]
    train = np.array([r.get("train_acc", np.nan) for r in records], dtype=float)
    val = np.array([r["val_acc"] for r in records], dtype=float)
    fig = Figure(figsize=(6.4, 3.4), layout="constrained")
    ax = fig.subplots()
    ax.plot(epochs, train, marker=".", color="#d62728", label="train")
    ax.plot(epochs, val, marker=".", color="#1f77b4", label="validation")
    ax.fill_between(epochs, val, train, where=train >= val, color="#d62728", alpha=0.12, label="gap")
    ax.set(xlabel="epoch", ylabel="accuracy")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def histogram_figure(history: list[dict[str, Any]], kind: str) -> Figure | None:
    """One panel per layer: the histogram of `kind` ("activations" or "gradients") at each recorded epoch."""
    snapshots = [(r["epoch"], r["babysit"].get(kind) or {}) for r in history if isinstance(r.get("babysit"), dict)]
    layers = list(dict.fromkeys(layer for _, stats in snapshots for layer in stats))
    if not layers:
        return None
    ncols = min(len(layers), 4)
    fig = Figure(figsize=(3.4 * ncols, 2.8 * math.ceil(len(layers) / ncols)), layout="constrained")
    axes = fig.subplots(math.ceil(len(layers) / ncols), ncols, squeeze=False).ravel()
    cmap = colormaps["viridis"]
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    for ax, layer in zip(axes, layers):
        last = None
        for i, (epoch, stats) in enumerate(snapshots):
            h = stats.get(layer)
            if not isinstance(h, dict) or not h.get("counts"):
                continue
            counts = np.asarray(h["counts"], dtype=float)
            share = counts / max(counts.sum(), 1.0)
            ax.stairs(np.where(share > 0, share, np.nan), h["edges"], color=cmap(i / max(len(snapshots) - 1, 1)),
                      lw=1.4, label=f"epoch {epoch}")
            last = h
        extra = ""
        if last is not None and kind == "activations" and isinstance(last.get("dead_fraction"), (int, float)):
            extra = f" (dead {last['dead_fraction']:.0%})"
        elif last is not None and isinstance(last.get("norm"), (int, float)):
            extra = f" (norm {last['norm']:.2g})"
        ax.set(yscale="log", title=layer + extra, xlabel="activation" if kind == "activations" else "weight gradient",
               ylabel="share of entries")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig


def weights_figure(tiles: tuple[str, np.ndarray]) -> Figure:
    """First-layer filters or units as a grid of images (each scaled on its own), or conv1d kernels as curves."""
    kind, data = tiles
    ncols = min(len(data), 16)
    nrows = math.ceil(len(data) / ncols)
    size = 0.75 if kind == "images" else 1.1
    fig = Figure(figsize=(max(size * ncols, 3.0), size * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for i, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= len(data):
            ax.set_visible(False)
        elif kind == "images":
            ax.imshow(data[i], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            ax.plot(data[i].T, lw=1.2)
    fig.suptitle(f"{len(data)} first-layer {'filters or units' if kind == 'images' else 'kernels'} "
                 f"(each scaled to its own range)", fontsize=10)
    return fig


def _first_layer(store: ExperimentStore, trial: str) -> tuple[Figure | None, str]:
    """The first-layer weights figure of the trial's best checkpoint, or None and why not."""
    best = next(iter(store.checkpoints(trial)), None)
    if best is None:
        return None, "no checkpoint"
    try:
        arrays, _ = store.read_checkpoint(best)
    except StorageError as exc:
        log.warning("skipping the first-layer weights of %s: %s", trial, exc)
        return None, f"unreadable checkpoint {best.path.name}"
    tiles = first_layer_tiles(arrays)
    if tiles is None:
        return None, "the inputs are not images and the first layer is not a convolution"
    return weights_figure(tiles), f"from {best.path.name}"


# the page ----------------------------------------------------------------------------------------
CSS = """
.babysit .diagnosis { margin: 4px 0 10px; padding: 6px 10px; border-left: 4px solid #ff9f1c; background: #fff8ec; }
.babysit .diagnosis.ok { border-color: #2ca02c; background: #f0f9f0; }
.babysit .panels { display: flex; flex-wrap: wrap; gap: 8px 18px; }
.babysit figure { margin: 0; }
.babysit figcaption { font-weight: 600; font-size: 13px; margin: 6px 0 2px; }
"""


def _panel(title: str, fig_id: str, fig: Figure | None, empty: str) -> str:
    """One captioned figure as an embedded PNG, or its caption and why there is none."""
    if fig is None:
        return f'<figure id="{fig_id}"><figcaption>{html.escape(title)}</figcaption><p class="note">' \
               f"{html.escape(empty)}</p></figure>"
    return (f'<figure><figcaption>{html.escape(title)}</figcaption><img id="{fig_id}" alt="{html.escape(title)}" '
            f'src="{_png(fig)}"></figure>')


def trial_section(store: ExperimentStore, trial: str, history: list[dict[str, Any]]) -> str:
    """One trial's diagnosis line and babysitting pictures as an HTML section (figure ids babysit-<trial>-<what>)."""
    result = store.read_result(trial)
    findings = diagnose(history, result.state.value if result else None, result.reason if result else "")
    weights, weights_note = _first_layer(store, trial)
    panels = [("loss over iterations (log)", "loss", loss_figure(history), "no loss trace recorded"),
              ("train vs validation accuracy", "accuracy", accuracy_figure(history), "no epoch finished"),
              ("activation histograms per layer", "activations", histogram_figure(history, "activations"),
               "no babysitting snapshot recorded"),
              ("weight-gradient histograms per layer", "gradients", histogram_figure(history, "gradients"),
               "no babysitting snapshot recorded"),
              (f"first-layer weights ({weights_note})", "weights", weights, weights_note),
              ("update / weight ratio per layer", "ratios", ratio_figure({trial: history}) if history else None,
               "no update ratios recorded")]
    sid = f"babysit-{html.escape(trial)}"
    state = f" · {result.state.value} ({html.escape(result.reason)})" if result else ""
    line = "; ".join(findings) or "no warning sign (loss falls, small gap, ratios near 1e-3, ReLUs alive)"
    return (f'<section class="babysit" id="{sid}"><h2>Babysitting {html.escape(trial)}{state}</h2>'
            f'<p class="diagnosis{"" if findings else " ok"}"><b>Diagnosis:</b> {html.escape(line)}</p>'
            f'<div class="panels">' + "".join(_panel(t, f"{sid}-{key}", f, e) for t, key, f, e in panels)
            + "</div></section>")


def sections_html(store: ExperimentStore, histories: dict[str, list[dict[str, Any]]]) -> str:
    """The babysitting sections of the given trials (the report's top ones), with their style."""
    if not histories:
        return ""
    return f"<style>{CSS}</style>" + "\n".join(trial_section(store, t, h) for t, h in histories.items())


def build_trial_report(store: ExperimentStore, trial: str) -> Path:
    """Write report/trial-<id>.html, the babysitting page of any one trial; ExperimentError if it has no spec."""
    spec = store.read_spec(trial)
    if spec is None:
        raise ExperimentError(f"trial {trial}: not found in experiment {store.experiment} "
                              f"({len(store.trial_ids())} trials there)")
    params = ", ".join(f"{k}={v}" for k, v in sorted((spec.get("params") or {}).items()))
    body = [f'<section id="params"><h2>{html.escape(trial)}</h2><p class="note">{html.escape(params)}</p></section>',
            sections_html(store, {trial: store.read_history(trial)})]
    path = store.report_dir / f"trial-{trial}.html"
    store.report_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, page_html(store, f"{store.experiment} / {trial}", body).encode())
    return path
