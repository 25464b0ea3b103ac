"""The report's curves over seeds: seeds evaluated at other x values are interpolated, not dropped."""

from __future__ import annotations

import numpy as np
import pytest

from poisonlab.report import _mean_band


def _run(points):
    return {"series": [{"poisons_seen": x, "perplexity_gap": g, "gap_ci_low": g - 1, "gap_ci_high": g + 1}
                       for x, g in points]}


def test_seeds_seen_at_other_counts_are_interpolated_over_their_common_range():
    a = _run([(0, 0.0), (100, 10.0), (200, 20.0), (300, 30.0)])
    b = _run([(0, 0.0), (150, 30.0), (250, 50.0)])  # ends before a does: the band stops at 250
    xs, mean, lo, hi = _mean_band([a, b], "poisons_seen")
    assert xs.tolist() == [0, 100, 150, 200, 250]
    # a at 150 is 15, b at 100 is 20 and at 200 is 40
    assert mean.tolist() == pytest.approx([0.0, 15.0, 22.5, 30.0, 37.5])
    assert lo.tolist() == pytest.approx([0.0, 10.0, 15.0, 20.0, 25.0])
    assert hi.tolist() == pytest.approx([0.0, 20.0, 30.0, 40.0, 50.0])


def test_one_seed_keeps_its_points_and_its_interval():
    xs, mean, lo, hi = _mean_band([_run([(0, 1.0), (50, 5.0)])], "poisons_seen")
    assert xs.tolist() == [0, 50] and mean.tolist() == [1.0, 5.0]
    assert lo.tolist() == [0.0, 4.0] and hi.tolist() == [2.0, 6.0]
    assert np.all(lo <= mean) and np.all(mean <= hi)
