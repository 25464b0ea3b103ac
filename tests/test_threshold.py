"""The poison-count search finds a known threshold with few runs."""

from __future__ import annotations

import math
import random

import pytest

from poisonlab.threshold import find_threshold, logistic_half_point


def test_a_sharp_threshold_is_found_within_the_resolution_in_few_runs():
    calls = []

    def succeeds(count, seed):
        calls.append((count, seed))
        return count >= 237

    r = find_threshold(succeeds, 10, 10_000, seeds=[0, 1, 2], resolution=0.1)
    assert r.highest_failure < 237 <= r.lowest_success <= r.highest_failure * 1.1 + 1
    assert r.runs == len(calls) <= 3 * 12  # a grid at 10% steps over 10..10,000 would need ~73 counts
    assert r.half_success is not None and r.highest_failure <= r.half_success <= r.lowest_success


def test_seed_noise_is_decided_by_the_majority_and_the_fit_finds_the_middle():
    rng = random.Random(0)

    def succeeds(count, seed):  # success probability rising through 1/2 at 250 poisons
        return rng.random() < 1 / (1 + math.exp(-6 * (math.log(count) - math.log(250))))

    r = find_threshold(succeeds, 20, 5000, seeds=list(range(5)), resolution=0.15)
    assert 120 <= r.lowest_success <= 500
    assert 150 <= r.half_success <= 420


def test_out_of_range_thresholds_are_reported_as_such():
    r = find_threshold(lambda c, s: False, 10, 1000, seeds=[0, 1])
    assert r.lowest_success is None and r.highest_failure == 1000 and r.runs == 2
    r = find_threshold(lambda c, s: True, 10, 1000, seeds=[0])
    assert r.lowest_success == 10 and r.highest_failure is None
    with pytest.raises(ValueError):
        find_threshold(lambda c, s: True, 10, 10, seeds=[0])
    assert logistic_half_point([(10, 0, True), (20, 0, True)]) is None


def test_extra_seeds_go_only_to_the_bracketing_counts():
    calls = []

    def succeeds(count, seed):
        calls.append((count, seed))
        return count >= 300

    r = find_threshold(succeeds, 25, 1600, seeds=[0, 1, 2], resolution=1.0, first_seeds=1)
    assert r.highest_failure < 300 <= r.lowest_success <= 2 * r.highest_failure
    full = {c for c, s in calls if s > 0}
    assert full == {r.highest_failure, r.lowest_success}  # seeds 1 and 2 only at the bracket
    assert len(calls) == len(set(calls))  # no run is asked for twice
    assert len(calls) <= 6 + 2 * 2


def test_a_bracket_overturned_by_the_other_seeds_is_searched_again_with_every_seed():
    def succeeds(count, seed):  # seed 0 is lucky: it succeeds from 100, the others only from 400
        return count >= (100 if seed == 0 else 400)

    r = find_threshold(succeeds, 25, 1600, seeds=[0, 1, 2], resolution=1.0, first_seeds=1)
    assert r.highest_failure < 400 <= r.lowest_success <= 2 * r.highest_failure
    by = {}
    for c, s, ok in r.observations:
        by.setdefault(c, []).append(ok)
    assert len(by[r.lowest_success]) == 3 and len(by[r.highest_failure]) == 3


def test_a_top_count_that_one_seed_fails_is_confirmed_and_the_search_stays_cheap():
    calls = []

    def succeeds(count, seed):  # seed 0 is unlucky at every count
        calls.append((count, seed))
        return seed != 0 and count >= 300

    r = find_threshold(succeeds, 25, 1600, seeds=[0, 1, 2], resolution=1.0, first_seeds=1)
    assert r.highest_failure < 300 <= r.lowest_success <= 2 * r.highest_failure
    # the bisection below 1,600 ran one seed per count; every seed only where a bracket was confirmed
    per_count = {}
    for c, s in calls:
        per_count.setdefault(c, set()).add(s)
    assert per_count[1600] == {0, 1, 2} and len(calls) <= 3 * 6


def test_the_final_table_counts_seeds_by_point_gap_and_by_interval():
    from poisonlab.report import final_table, format_final_table

    def run(seed, gap, lo):
        final = {"fraction": 1.0, "perplexity_untriggered": 30.0, "perplexity_triggered": 30.0 + gap,
                 "perplexity_gap": gap, "gap_ci_low": lo, "gap_ci_high": gap + 10, "heldout_loss": 3.0}
        return {"model_size": "1m", "poison_count": 1600, "data_multiplier": 1.0, "status": "done",
                "series": [final], "seed": seed}

    # point gaps above 50 in both seeds, intervals reaching below it in one
    (row,) = final_table({"a": run(0, 59.4, 45.2), "b": run(1, 70.0, 55.0)}, 50.0)
    assert row["success"] == "2/2" and row["success_interval"] == "1/2"
    assert "interval > threshold" in format_final_table([row]).splitlines()[0]
