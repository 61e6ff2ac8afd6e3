"""Where a stage's best trials sit in each range: border flags, and the narrowed (or widened) ranges they support."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from master.config import Distribution

EDGE = 0.1  # the outer fraction of a range, in the sampled scale, that counts as its border
WIDEN = 0.2  # a flagged side moves out by this fraction of the range
ALPHA = 0.1  # evidence is weak when chance alone would cluster the top trials so tightly this often or more
MIN_EVIDENCE = 3  # fewer top trials than this never narrow a range
PERMUTATIONS = 2000  # random subsets drawn to judge how tightly chance clusters the top trials
SIDES = ("lower", "upper")

Scored = tuple[dict[str, Any], float]  # (a trial's params, its best validation accuracy)


def best_count(fraction: float, n: int) -> int:
    """How many of ``n`` trials the best ``fraction`` of them is: rounded up, at least one."""
    return max(1, math.ceil(fraction * n))


def top_trials(scored: Sequence[Scored], top: int | None = None, quantile: float | None = None) -> list[Scored]:
    """The best ``top`` trials, else the best ``quantile`` fraction (at least one), best first."""
    ranked = sorted(scored, key=lambda s: s[1], reverse=True)
    return ranked[:top if top is not None else best_count(quantile or 1.0, len(ranked))]


def iqr(x: np.ndarray) -> np.ndarray:
    """Interquartile range along the last axis."""
    q25, q75 = np.percentile(x, [25, 75], axis=-1)
    return q75 - q25


def chance_of_spread(top: Sequence[float], everyone: Sequence[float], draws: int = PERMUTATIONS) -> float:
    """How often a random subset of the stage's trials (positions ``everyone``) as large as the top group
    is at least as tightly clustered (interquartile range) as the top group: a permutation test, fixed seed."""
    pool, n = np.asarray(everyone, dtype=float), len(top)
    if n >= len(pool):
        return 1.0
    keys = np.random.default_rng(0).random((draws, len(pool)))
    subsets = pool[np.argpartition(keys, n - 1, axis=1)[:, :n]]  # the n smallest keys: argsort's subset, O(N)
    return float((1 + np.sum(iqr(subsets) <= iqr(np.asarray(top, dtype=float)) + 1e-12)) / (draws + 1))


def weak_evidence(top: Sequence[float], everyone: Sequence[float]) -> bool:
    """True when the top trials' positions are no more clustered than chance makes them (or too few to tell)."""
    return len(top) < MIN_EVIDENCE or chance_of_spread(top, everyone) >= ALPHA


def core(units: Sequence[float]) -> list[float]:
    """The top trials' positions (best first) without outliers beyond Tukey's fences (1.5 interquartile
    ranges past the quartiles); the best trial always stays."""
    q25, q75 = np.percentile(units, [25, 75])
    fence = 1.5 * (q75 - q25)
    return [u for i, u in enumerate(units) if i == 0 or q25 - fence <= u <= q75 + fence]


def border_side(units: Sequence[float], edge: float = EDGE) -> str | None:
    """"upper" ("lower") when the best trial (``units[0]``) sits in the outer ``edge`` of that side and
    most of the top trials lie in that half of the range; else None."""
    if not units:
        return None
    for side, outer, on_side in (("upper", lambda u: u >= 1 - edge, lambda u: u > 0.5),
                                 ("lower", lambda u: u <= edge, lambda u: u < 0.5)):
        if outer(units[0]) and 2 * sum(map(on_side, units)) > len(units):
            return side
    return None


def _fmt(dist: Distribution, value: Any, best: bool = False) -> str:
    if dist.integer:
        return str(int(value))
    if dist.log:
        short = f"{value:.0e}"
        return f"{value:.1e}" if best or float(short) != value else short
    return f"{value:.3g}"


def range_text(dist: Distribution) -> str:
    """A range for people: ``[1e-04, 1e-01]`` (log), ``[0, 0.5]``, ``[16, 256]``, or ``[64] | [128]`` for choices."""
    if dist.dist == "choice":
        return " | ".join(json.dumps(v) for v in dist.values)
    return f"[{_fmt(dist, dist.low)}, {_fmt(dist, dist.high)}]"


@dataclass(frozen=True)
class BorderFlag:
    """A numeric parameter whose best values sit at one border of its range, and the range to try next."""

    name: str
    side: str
    best: float
    low: float
    high: float
    new_low: float
    new_high: float

    @property
    def widened(self) -> bool:
        return (self.new_high > self.high) if self.side == "upper" else (self.new_low < self.low)

    def message(self, dist: Distribution) -> str:
        """e.g. ``solver.lr: best 8.7e-02 at the upper border of [1e-06, 1e-01] -> widen to [1e-04, 1e+00]``."""
        old = f"[{_fmt(dist, self.low)}, {_fmt(dist, self.high)}]"
        new = f"[{_fmt(dist, self.new_low)}, {_fmt(dist, self.new_high)}]"
        action = f"widen to {new}" if self.widened else f"cannot widen past the valid values; keep {new}"
        return f"{self.name}: best {_fmt(dist, self.best, best=True)} at the {self.side} border of {old} -> {action}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _at(dist: Distribution, u: float) -> Any:
    """The value at ``u``, exactly the old bound at 0 and 1 (no round trip through the log scale)."""
    return dist.low if u == 0 else dist.high if u == 1 else dist.from_unit(u)


def derive_range(dist: Distribution, units: Sequence[float], everyone: Sequence[float], pad: float,
                 side: str | None, valid: Callable[[Any], bool], widen: float = WIDEN) -> tuple[Any, Any]:
    """New (low, high) for a numeric ``dist`` from the top trials' positions (best first) in its range and
    those of all the stage's ranked trials (``everyone``).

    The span of the top trials (outliers aside) padded by ``pad`` of the range on each side, clipped to the
    old range; the whole old range where the evidence is weak; a flagged ``side`` moved out by ``widen`` of
    the range instead, unless ``valid`` refuses the value out there (then that side keeps its old bound).
    """
    kept = core(units) if units else []
    weak = weak_evidence(units, everyone)
    lo, hi = (0.0, 1.0) if weak else (max(0.0, min(kept) - pad), min(1.0, max(kept) + pad))
    low, high = _at(dist, lo), _at(dist, hi)
    if side is not None:
        out = dist.from_unit(1.0 + widen if side == "upper" else -widen)
        if (out > 0 or not dist.log) and valid(out):
            low, high = (low, out) if side == "upper" else (out, high)
    if low >= high:  # an int range rounded to one value, or identical top values with no padding
        return (low, low + 1) if dist.integer else (dist.low, dist.high)
    return low, high


def narrow_choice(dist: Distribution, top: Sequence[Any], everyone: Sequence[Any]) -> Distribution:
    """``dist`` without the choices none of the top trials took, where chance alone would rarely leave that
    choice out of a random subset of the stage's trials as large as the top group (hypergeometric,
    below ALPHA); else ``dist`` unchanged."""
    n, total = len(top), len(everyone)
    if n < MIN_EVIDENCE or n >= total:
        return dist
    kept = tuple(v for v in dist.values
                 if v in top or math.comb(total - everyone.count(v), n) / math.comb(total, n) >= ALPHA)
    return dataclasses.replace(dist, values=kept) if kept != dist.values else dist


def analyse(top: Sequence[Scored], everyone: Sequence[Scored], space: Sequence[Distribution], pad: float,
            valid: Callable[[str, Any], bool], edge: float = EDGE) -> tuple[tuple[Distribution, ...], list[BorderFlag]]:
    """The narrowed space and the border flags supported by the ``top`` trials (best first) among
    ``everyone`` ranked in a stage that sampled ``space``; ``valid(name, value)`` says whether a value
    outside the old range may be tried."""
    new_space, flags = [], []
    for dist in space:
        values = [params[dist.name] for params, _ in top if dist.name in params]
        pool = [params[dist.name] for params, _ in everyone if dist.name in params]
        if dist.dist == "choice":
            new_space.append(narrow_choice(dist, values, pool))
            continue
        units = [dist.to_unit(v) for v in values]
        side = border_side(units, edge)
        low, high = derive_range(dist, units, [dist.to_unit(v) for v in pool], pad, side,
                                 lambda v, name=dist.name: valid(name, v))
        new_space.append(dataclasses.replace(dist, low=low, high=high))
        if side is not None:
            flags.append(BorderFlag(dist.name, side, values[0], dist.low, dist.high, low, high))
    return tuple(new_space), flags
