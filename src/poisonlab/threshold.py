"""How many poisons does a backdoor need? An adaptive search over the poison count.

Training runs are expensive, so the count is searched, not gridded: the success of a count is
decided by its seeds (a majority of runs whose final gap passes the threshold), and the
search bisects on a log scale between a count that fails and one that succeeds until the two
are within ``resolution`` of each other. Every run made is kept, and a logistic fit of success
against log(count) over all of them gives the count at which half the runs succeed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ThresholdResult:
    lowest_success: int | None
    """Smallest count found to succeed (None: not even ``high`` did, inside the budget)."""
    highest_failure: int | None
    """Largest count found to fail (None: even ``low`` succeeded)."""
    observations: list[tuple[int, int, bool]] = field(default_factory=list)
    """(count, seed, success) of every run made, in order."""
    half_success: float | None = None
    """Count at which the logistic fit over all runs gives 50% success."""

    @property
    def runs(self) -> int:
        return len(self.observations)


def find_threshold(succeeds: Callable[[int, int], bool], low: int, high: int, seeds: list[int],
                   resolution: float = 0.25, first_seeds: int | None = None) -> ThresholdResult:
    """Search the smallest poison count in ``[low, high]`` whose runs succeed.

    ``succeeds(count, seed)`` trains (or looks up) one run and says whether its backdoor
    passed the threshold. A count succeeds when most of the seeds asked succeed; success is
    assumed to grow with the count. The search stops when the failing and succeeding counts
    are within a factor ``1 + resolution``.

    With ``first_seeds`` = k, the bisection runs k seeds per count, and only the two counts
    that end up bracketing the threshold get every seed; where the full set of seeds
    overturns a bracket, the k-seed bisection goes on inside the new bracket, whose ends are
    again confirmed with every seed. Seeds are spent near the boundary, where a single run's
    luck decides the answer."""
    if not 0 < low < high:
        raise ValueError("need 0 < low < high")
    if not seeds:
        raise ValueError("need at least one seed")
    everyone = len(seeds)
    k = everyone if first_seeds is None else max(1, min(first_seeds, everyone))
    ran: dict[tuple[int, int], bool] = {}
    obs: list[tuple[int, int, bool]] = []
    decided: dict[tuple[int, int], bool] = {}

    def decide(count: int, n: int) -> bool:
        if (count, n) not in decided:
            wins = 0
            for s in seeds[:n]:
                if (count, s) not in ran:
                    ran[count, s] = bool(succeeds(count, s))
                    obs.append((count, s, ran[count, s]))
                wins += ran[count, s]
            decided[count, n] = wins * 2 > n
        return decided[count, n]

    def bisect(lo: int, hi: int, n: int) -> tuple[int, int]:
        while hi > lo * (1 + resolution) and hi - lo > 1:
            mid = min(max(int(round(math.sqrt(lo * hi))), lo + 1), hi - 1)
            if decide(mid, n):
                hi = mid
            else:
                lo = mid
        return lo, hi

    def bracket(n: int, lo: int | None, hi: int | None) -> tuple[int | None, int | None]:
        """(largest failing, smallest succeeding) count with ``n`` seeds; None: out of range."""
        if hi is None:
            if not decide(high, n):
                return high, None
            hi = high
        if lo is None:
            if decide(low, n):
                return None, low
            lo = low
        return bisect(lo, hi, n)

    def known(c: int) -> bool:
        """A count's decision: with every seed where that was asked, else with k."""
        return decided[c, everyone] if (c, everyone) in decided else decided[c, k]

    def seen(pred) -> list[int]:
        return sorted({c for (c, _) in decided if pred(c)})

    lo, hi = bracket(k, None, None)
    while k < everyone:
        if hi is not None and not decide(hi, everyone):
            # the upper end fails with every seed: bisect (k seeds) up to the next known success
            ups = seen(lambda c: c > hi and known(c))
            if not ups:
                lo, hi = high, None
                break
            lo, hi = bisect(hi, ups[0], k)
            continue
        if lo is not None and decide(lo, everyone):
            # the lower end succeeds with every seed: bisect down to the next known failure
            downs = seen(lambda c: c < lo and not known(c))
            if not downs and (low, k) not in decided and not decide(low, k):
                downs = [low]
            if not downs:
                lo, hi = None, low
                continue  # low itself is confirmed (or overturned) on the next pass
            lo, hi = bisect(downs[-1], lo, k)
            continue
        break
    return ThresholdResult(hi, lo, obs, logistic_half_point(obs))


def logistic_half_point(obs: list[tuple[int, int, bool]], ridge: float = 1e-3) -> float | None:
    """The count where P(success) = 1/2 under success ~ sigmoid(a + b log count), fitted by
    Newton's method with a small ridge (so runs that separate perfectly still give a point)."""
    if not obs:
        return None
    x = np.log(np.array([c for c, _, _ in obs], dtype=float))
    y = np.array([ok for _, _, ok in obs], dtype=float)
    if y.min() == y.max():
        return None
    xm = x.mean()
    X = np.stack([np.ones_like(x), x - xm], axis=1)
    w = np.zeros(2)
    for _ in range(100):
        p = 1 / (1 + np.exp(-(X @ w)))
        grad = X.T @ (y - p) - ridge * w
        hess = X.T @ (X * (p * (1 - p))[:, None]) + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w += step
        if np.abs(step).max() < 1e-9:
            break
    if w[1] <= 0:
        return None
    return float(math.exp(xm - w[0] / w[1]))
