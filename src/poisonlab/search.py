"""A spec's poison-count search: the smallest count that plants the backdoor, per setting.

    search:
      over: {model.size: [tiny, 400k, 1m]}   # one search per combination (like a grid; a list
                                             # of mappings adds their combinations together)
      low: 25                                # the counts searched, on a log scale
      high: 1600
      seeds: [0, 1, 2]                       # a count succeeds when most of its seeds do
      first_seeds: 1                         # seeds per count while bisecting; the rest only
                                             # at the two counts that bracket the threshold
      resolution: 1.0                        # stop when the bracket is within a factor 2

``search`` may also be a list of such mappings, each with its own range (a smaller budget
holds fewer poisons). A run succeeds when its last evaluation's gap interval lies above ``eval.threshold`` (the
end-of-training gap's lower bound > 50 by default). The search (:func:`poisonlab.threshold.find_threshold`)
is a pure function of the runs' outcomes, so it is never stored: replaying it on the results
at hand gives the runs already made and the next one to make. A sweep interrupted anywhere,
or continued on another machine from exported results, asks for exactly the runs still
missing.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any

from .config import RunConfig
from .errors import PoisonlabError
from .jsonl import read_jsonl
from .threshold import ThresholdResult, find_threshold

SEARCH_KEYS = ("over", "low", "high", "seeds", "first_seeds", "resolution")
COUNT_KEY = "attack.poison_count"


@dataclass
class SearchSpec:
    over: list[dict[str, list]] = field(default_factory=lambda: [{}])
    """Settings searched separately: a mapping of keys to values (every combination), or a list
    of such mappings whose combinations are added together, as for a grid."""
    low: int = 25
    high: int = 1600
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    first_seeds: int = 1
    resolution: float = 1.0

    def combinations(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for over in self.over:
            keys = list(over)
            for values in itertools.product(*(over[k] for k in keys)):
                combo = dict(zip(keys, values))
                if combo not in out:
                    out.append(combo)
        return out


def search_from_dict(data: Any, known_keys: set[str]) -> SearchSpec:
    if not isinstance(data, dict):
        raise PoisonlabError("spec key 'search' must be a mapping")
    unknown = sorted(set(data) - set(SEARCH_KEYS))
    if unknown:
        raise PoisonlabError(f"unknown search key '{unknown[0]}' (allowed: {', '.join(SEARCH_KEYS)})")
    raw = data.get("over") or {}
    overs = raw if isinstance(raw, list) else [raw]
    for over in overs:
        if not isinstance(over, dict):
            raise PoisonlabError("search.over must map dotted run-config keys to lists of values (or be a list of such)")
        for k, v in over.items():
            if k not in known_keys or k in (COUNT_KEY, "seed"):
                raise PoisonlabError(f"search.over key '{k}' is not a run-config key the search can vary")
            if not isinstance(v, list) or not v:
                raise PoisonlabError(f"search.over key '{k}' must map to a non-empty list of values")
    s = SearchSpec(over=overs)
    for key, tp in (("low", int), ("high", int), ("first_seeds", int), ("resolution", float)):
        if key in data:
            v = data[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (tp is int and int(v) != v):
                raise PoisonlabError(f"search.{key} must be a number{' (whole)' if tp is int else ''}, got {v!r}")
            setattr(s, key, tp(v))
    if "seeds" in data:
        seeds = data["seeds"]
        if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and x >= 0 for x in seeds):
            raise PoisonlabError("search.seeds must be a non-empty list of seeds (integers >= 0)")
        s.seeds = seeds
    if not 0 < s.low < s.high:
        raise PoisonlabError(f"search needs 0 < low < high, got low {s.low}, high {s.high}")
    if s.resolution <= 0 or s.first_seeds < 1:
        raise PoisonlabError("search.resolution must be > 0 and search.first_seeds >= 1")
    return s


class _Missing(Exception):
    def __init__(self, count: int, seed: int):
        self.count, self.seed = count, seed


def run_config(template: RunConfig, combo: dict, count: int, seed: int, spec_name: str) -> RunConfig:
    from .spec import run_name

    name = run_name(spec_name, {**combo, COUNT_KEY: count, "seed": seed})
    return replace(template, name=name, seed=seed, attack=replace(template.attack, poison_count=count))


def final_success(folder) -> bool | None:
    """Whether a finished run's last evaluation cleared the threshold (None: not finished)."""
    if not (folder / "DONE").is_file():
        return None
    rows = [r for r in read_jsonl(folder / "metrics.jsonl") if "gap_ci_low" in r]
    if not rows:
        raise PoisonlabError(f"{folder}: finished, but no backdoor evaluation was recorded")
    last = rows[-1]
    return bool(last["gap_ci_low"] > last.get("threshold", 50.0))


@dataclass
class SearchState:
    combo: dict[str, Any]
    runs: list[RunConfig]
    """Runs the search has made so far, in the order it asked for them."""
    pending: RunConfig | None
    """The next run the search needs (None: the search is complete)."""
    result: ThresholdResult | None
    """The search's answer once complete."""


@dataclass
class Target:
    """One search: the setting it holds fixed, the run config it starts from, its settings."""
    combo: dict[str, Any]
    template: RunConfig
    search: SearchSpec


def replay(spec, target: Target) -> SearchState:
    """Run one search on the results at hand, up to the first run that is missing."""
    from .archive import run_folder

    s, combo, template = target.search, target.combo, target.template
    made: list[RunConfig] = []

    def succeeds(count: int, seed: int) -> bool:
        cfg = run_config(template, combo, count, seed, spec.name)
        ok = final_success(run_folder(spec, cfg))
        if ok is None:
            raise _Missing(count, seed)
        made.append(cfg)
        return ok

    try:
        result = find_threshold(succeeds, s.low, s.high, s.seeds, s.resolution, s.first_seeds)
    except _Missing as m:
        return SearchState(combo, made, run_config(template, combo, m.count, m.seed, spec.name), None)
    return SearchState(combo, made, None, result)


def states(spec) -> list[SearchState]:
    """Where each of the spec's searches stands."""
    return [replay(spec, t) for t in spec.search_targets()]


def searches_from(data: Any, known_keys: set[str]) -> list[SearchSpec]:
    """A spec's ``search``: one mapping, or a list of them (searches with their own ranges)."""
    items = data if isinstance(data, list) else [data]
    return [search_from_dict(d, known_keys) for d in items]
