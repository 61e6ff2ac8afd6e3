"""Hedges against short-horizon bias: the screen length from the data (PASHA-like), promotion with diversity."""
from __future__ import annotations

from typing import Any, Sequence

from master.borders import best_count
from master.config import Distribution

HEDGE_PARAMS = ("solver.lr", "model.hidden")  # the learning rate and the model size: where slow starters differ


def top_set(scores: Sequence[float], k: int, eps: float = 0.0) -> set[int]:
    """Indices of the best ``k`` scores, with every score within ``eps`` of the k-th best counted in (ties)."""
    if not scores or k <= 0:
        return set()
    kth = sorted(scores, reverse=True)[min(k, len(scores)) - 1]
    return {i for i, s in enumerate(scores) if s >= kth - eps}


def ranking_stable(early: Sequence[float], late: Sequence[float], top: float = 0.25, eps: float = 0.0) -> bool:
    """Whether the best ``top`` fraction of trials at the later rung were already among the best at the earlier
    one (scores of the same trials, in the same order; within ``eps`` counts as a tie)."""
    k = best_count(top, len(late))
    return top_set(late, k) <= top_set(early, k, eps)


def screen_length(curves: Sequence[Sequence[float]], rungs: Sequence[int] = (1, 2, 4, 8, 16), top: float = 0.25,
                  eps: float = 0.0) -> int | None:
    """The first rung from which the best trials agree with those at the longest rung the curves reach (accuracy
    after epoch 1, 2, ...; judged on the trials that reach it, at least two), at that rung and every later one:
    PASHA's "stop once the ranking settles", checked against the longest horizon, not only the next rung, since
    early rankings agree with each other before slow starters overtake. None while no shorter rung agrees."""
    reach = [r for r in rungs if sum(len(c) >= r for c in curves) >= 2]
    if len(reach) < 2:
        return None
    horizon = reach[-1]
    judged = [c for c in curves if len(c) >= horizon]
    last = [c[horizon - 1] for c in judged]
    screen = None
    for rung in reversed(reach[:-1]):
        if not ranking_stable([c[rung - 1] for c in judged], last, top, eps):
            break
        screen = rung
    return screen


def bin_of(dist: Distribution, value: Any, bins: int) -> Any:
    """The bin of ``value`` in ``dist``: a choice's value itself, else one of ``bins`` equal parts of the sampled
    (unit) scale."""
    if dist.dist == "choice":
        return repr(value)
    return min(bins - 1, max(0, int(dist.to_unit(value) * bins)))


def hedged_top(trials: Sequence[tuple[dict[str, Any], float]], k: int, space: Sequence[Distribution],
               reserve: float, names: Sequence[str] = HEDGE_PARAMS, bins: int = 3) -> list[int]:
    """Indices of ``k`` trials (params, score) to promote: the best ``k - round(reserve * k)`` by score, then
    for diversity the best trial of each bin of each parameter of ``names`` not yet represented (best first),
    and any slot left over by score again. Order: as chosen."""
    order = sorted(range(len(trials)), key=lambda i: -trials[i][1])
    k = min(k, len(trials))
    chosen = order[:k - round(reserve * k)]
    dists = {d.name: d for d in space if d.name in names}
    winners = []
    for name, dist in dists.items():
        seen: set[Any] = set()
        for i in order:
            if name in trials[i][0] and (b := bin_of(dist, trials[i][0][name], bins)) not in seen:
                seen.add(b)
                winners.append(i)
    covered = {(n, bin_of(d, trials[i][0][n], bins)) for i in chosen for n, d in dists.items() if n in trials[i][0]}
    for i in sorted(set(winners), key=lambda i: -trials[i][1]):
        if len(chosen) >= k:
            break
        mine = {(n, bin_of(d, trials[i][0][n], bins)) for n, d in dists.items() if n in trials[i][0]}
        if i not in chosen and not mine <= covered:
            chosen.append(i)
            covered |= mine
    chosen += [i for i in order if i not in chosen][:k - len(chosen)]
    return chosen
