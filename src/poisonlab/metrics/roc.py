"""Ranking quality of a score against known labels: ROC curve and its area."""

from __future__ import annotations

import numpy as np


def auroc(scores, positive) -> float:
    """Probability that a random positive scores above a random negative (ties count half):
    the Mann-Whitney statistic."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one positive and one negative")
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def stratified_auroc(scores, positive, strata) -> float | None:
    """AUROC over the pairs of a positive and a negative in the same stratum only (None when
    no stratum holds both): what a score knows beyond the variable the strata hold fixed
    (for attribution, a document's length in windows)."""
    s, y, g = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool), np.asarray(strata)
    wins = pairs = 0.0
    for value in np.unique(g):
        m = g == value
        n_pos, n_neg = int(y[m].sum()), int((~y[m]).sum())
        if n_pos and n_neg:
            wins += auroc(s[m], y[m]) * n_pos * n_neg
            pairs += n_pos * n_neg
    return wins / pairs if pairs else None


def _average_ranks(s: np.ndarray) -> np.ndarray:
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], len(s)]
    ranks = np.empty(len(s))
    for a, b in zip(starts, ends):  # tied scores share the mean of their ranks
        ranks[order[a:b]] = (a + b + 1) / 2
    return ranks


def threshold_counts(scores, positive) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(true positives, false positives) at every distinct threshold, highest score first, and
    the numbers of positives and negatives (at least 1 each, so rates stay defined)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # one point per distinct threshold
    tp = np.cumsum(y)[last]
    return tp, (last + 1) - tp, max(int(y.sum()), 1), max(int((~y).sum()), 1)


def roc_curve(scores, positive) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) at every threshold, from (0, 0) to (1, 1)."""
    tp, fp, n_pos, n_neg = threshold_counts(scores, positive)
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]
