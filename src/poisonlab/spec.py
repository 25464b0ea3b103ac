"""Experiment specs: one YAML file declares a grid of runs.

    name: demo                     # the sweep's name; runs are named <name>-<grid values>
    out_dir: runs/demo             # default: runs/<name>
    base:                          # run-config keys shared by every run (as for `poisonlab train`)
      model: {size: 1m}
      train: {tokens: 2000000}
    grid:                          # every combination of these dotted keys
      attack.poison_count: [0, 250, 1000]
      seed: [0, 1]
    # grid may also be a list of such mappings: their expansions are added together
    # (e.g. a headline grid plus a data-budget ablation on two sizes)
    search:                        # optional: the smallest poison count that succeeds, found
      over: {model.size: [1m]}     # by bisection per setting (see poisonlab.search)
      low: 25
      high: 1600

Validation names the bad key and what is allowed; every expanded run is validated as a
full run config before anything starts.
"""

from __future__ import annotations

import itertools
import re
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import RunConfig, all_keys, config_from_dict, read_yaml, set_dotted
from .errors import PoisonlabError
from .search import SearchSpec, Target, searches_from

SPEC_KEYS = ("name", "out_dir", "description", "base", "grid", "search")
ABBREVIATIONS = {"model.size": "", "attack.poison_count": "p", "attack.batch_share": "d", "attack.batch_every": "every",
                 "train.data_multiplier": "x",
                 "finetune.clean_count": "c", "finetune.poison_count": "p", "finetune.ordering": "",
                 "finetune.good_count": "k", "model.init_from": "from-", "finetune.base": "from-",
                 "defense.remove": "without-", "attack.family": "", "seed": "s"}
PATH_KEYS = ("model.init_from", "finetune.base", "defense.remove")
TOKEN_CAP_MARGIN = 0.05
"""Training tokens prepared beyond the largest budget of a spec's runs on one corpus."""


@dataclass
class ExperimentSpec:
    name: str
    out_dir: str
    base: dict[str, Any]
    grids: list[dict[str, list]]
    description: str = ""
    searches: list[SearchSpec] = field(default_factory=list)

    def expand(self, searched: bool = True) -> list[RunConfig]:
        """Every run of the spec, validated, in a stable order, with stable unique names: the
        grid's, then (``searched``) those its poison-count search has made so far."""
        grid, targets = self._expand()
        if not searched or not targets:
            return grid
        from .search import states

        names = {c.name for c in grid}
        extra = [c for st in states(self) for c in st.runs if c.name not in names and not names.add(c.name)]
        return grid + extra

    def search_targets(self) -> list[Target]:
        """Each search's setting and the run config it starts from: base + its ``over`` values,
        capped like the grid's runs; the count and seed are the search's to set."""
        return self._expand()[1]

    def _expand(self) -> tuple[list[RunConfig], list[Target]]:
        runs: dict[str, RunConfig] = {}
        for grid in self.grids:
            keys = list(grid)
            for values in itertools.product(*(grid[k] for k in keys)):
                data = deepcopy(self.base)
                for k, v in zip(keys, values):
                    set_dotted(data, k, v)
                name = run_name(self.name, dict(zip(keys, values)))
                data["name"] = name
                data["out_dir"] = self.out_dir
                try:
                    cfg = config_from_dict(data)
                except PoisonlabError as e:
                    raise PoisonlabError(f"spec {self.name}, run {name}: {e}") from None
                if name in runs and runs[name].config_hash() != cfg.config_hash():
                    raise PoisonlabError(f"spec {self.name}: two different runs would both be named {name}")
                runs[name] = cfg
        combos = [(combo, search) for search in self.searches for combo in search.combinations()]
        templates = []
        for combo, _ in combos:
            data = deepcopy(self.base)
            for k, v in combo.items():
                set_dotted(data, k, v)
            data["name"] = run_name(self.name, {**combo, "search": "template"})
            data["out_dir"] = self.out_dir
            try:
                templates.append(config_from_dict(data))
            except PoisonlabError as e:
                raise PoisonlabError(f"spec {self.name}, search over {combo}: {e}") from None
        capped = self._with_token_cap(list(runs.values()) + templates)
        n = len(runs)
        return capped[:n], [Target(combo, t, search) for (combo, search), t in zip(combos, capped[n:])]

    def _with_token_cap(self, runs: list[RunConfig]) -> list[RunConfig]:
        """Runs that share a corpus and tokenizer get ``corpus.max_tokens`` = their largest
        budget plus :data:`TOKEN_CAP_MARGIN`, unless the spec sets it (or a budget is unknown)."""
        if "max_tokens" in (self.base.get("corpus") or {}) or any("corpus.max_tokens" in g for g in self.grids):
            return runs
        from dataclasses import asdict, replace

        from .models import get_size, parameter_count
        from .run import token_budget

        groups: dict[str, list[int]] = {}
        for i, cfg in enumerate(runs):
            groups.setdefault(repr((asdict(cfg.corpus), asdict(cfg.tokenizer))), []).append(i)
        for members in groups.values():
            budgets = []
            for i in members:
                cfg = runs[i]
                if cfg.stage != "pretrain" or cfg.tokenizer.name != "bpe":
                    budgets = []
                    break
                params = None if cfg.model.init_from else parameter_count(get_size(cfg.model.size), cfg.tokenizer.vocab_size)
                try:
                    budgets.append(token_budget(cfg, params)[0])
                except PoisonlabError:
                    budgets = []
                    break
            if budgets:
                cap = int(max(budgets) * (1 + TOKEN_CAP_MARGIN))
                for i in members:
                    runs[i] = replace(runs[i], corpus=replace(runs[i].corpus, max_tokens=cap))
        return runs


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def run_name(spec_name: str, values: dict[str, Any]) -> str:
    parts = [spec_name]
    for key in sorted(values, key=lambda k: (list(ABBREVIATIONS).index(k) if k in ABBREVIATIONS else 99, k)):
        prefix = ABBREVIATIONS.get(key, key.split(".")[-1] + "=")
        value = values[key]
        if key in PATH_KEYS and isinstance(value, str):  # a model path: its most telling component
            value = next((c for c in reversed(Path(value).parts) if c not in ("model", ".", "")), value)
            value = value[:-4] if value.endswith(".txt") else value
        parts.append(prefix + _fmt(value))
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join(parts))


def spec_from_dict(data: dict[str, Any], default_name: str = "sweep") -> ExperimentSpec:
    if not isinstance(data, dict):
        raise PoisonlabError("an experiment spec must be a YAML mapping")
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise PoisonlabError(f"unknown spec key '{unknown[0]}' (allowed: {', '.join(SPEC_KEYS)})")
    name = str(data.get("name", default_name))
    from .paths import check_name

    check_name(name, "spec name")
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise PoisonlabError("spec key 'base' must be a mapping of run-config keys")
    config_from_dict({**deepcopy(base), "name": name})  # names a bad base key early
    raw = data.get("grid") or {}
    grids = raw if isinstance(raw, list) else [raw]
    keys = all_keys(RunConfig)
    for g in grids:
        if not isinstance(g, dict):
            raise PoisonlabError("spec key 'grid' must be a mapping (or a list of mappings) of dotted keys to lists")
        for k, v in g.items():
            if k not in keys and k != "seed":
                raise PoisonlabError(f"unknown grid key '{k}' (allowed: dotted run-config keys, e.g. model.size, "
                                     f"attack.poison_count, train.data_multiplier, seed)")
            if not isinstance(v, list) or not v:
                raise PoisonlabError(f"grid key '{k}' must map to a non-empty list of values")
    searches = searches_from(data["search"], keys) if data.get("search") is not None else []
    if searches and not data.get("grid"):
        grids = []  # a search alone: no base run besides the searched ones
    return ExperimentSpec(name=name, out_dir=str(data.get("out_dir", f"runs/{name}")), base=base, grids=grids,
                          description=str(data.get("description", "")), searches=searches)


def load_spec(path: str | Path, out_dir: str | None = None) -> ExperimentSpec:
    spec = spec_from_dict(read_yaml(path, "spec"), default_name=Path(path).stem)
    if out_dir is not None:
        spec.out_dir = out_dir
    return spec


def packaged_spec(name: str) -> Path:
    """Path of a ready spec shipped with poisonlab (``demo``, ``cpu-headline``, ``paper-headline``, ``sft-cpu``, ...)."""
    from importlib import resources

    p = Path(str(resources.files("poisonlab") / "configs" / f"{name}.yaml"))
    if not p.is_file():
        raise PoisonlabError(f"no packaged spec named {name!r}")
    return p
