"""A run directory: everything a training run needs, created once and verified on resume.

``<out_dir>/<name>/`` holds ``config.yaml`` (resolved), ``run.json`` (provenance: code
version, config hash, data hashes, sizes, budget), ``tokenizer/``, ``poisons.jsonl`` and
``poison_tokens.safetensors`` (the poison documents), ``injection_manifest.jsonl`` (the
plan), ``checkpoints/``, ``train_log.jsonl``, ``metrics.jsonl``, ``samples.jsonl`` and, when
finished, ``model/`` (a labelled Hugging Face model folder) and ``DONE``.
Prepared corpus data is shared by runs in ``<out_dir>/cache``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .attacks.dos import trigger_ids
from .config import RunConfig, dump_config, load_config
from .data import PreparedData, prepare_data
from .errors import PoisonlabError
from .jsonl import read_json, write_jsonl
from .injection import BatchPlacement, InjectionPlan, ShuffledDocuments, TrainingStream, plan_injection
from .models import ModelSize, ParameterCount, chinchilla_tokens, get_size, parameter_count
from .paths import atomic_write_text, safe_join
from .defenses.manifest import write_corpus_manifest
from .provenance import code_version, environment, file_sha256, source_hash


@dataclass
class Run:
    cfg: RunConfig
    dir: Path
    data: PreparedData
    size: ModelSize | None
    params: ParameterCount | None
    budget_tokens: int
    steps: int
    tokens_per_step: int
    plan: InjectionPlan
    poison_ids: list[np.ndarray]
    trigger_ids: list[int]
    info: dict
    keep: np.ndarray | None = None
    """Mask over the clean training documents left after a defense filter (None: all)."""

    @property
    def tokenizer(self):
        return self.data.tokenizer

    def stream(self) -> TrainingStream:
        return TrainingStream(ShuffledDocuments(self.data.train, self.cfg.seed, self.keep), self.plan, self.poison_ids)

    def label_fields(self) -> dict:
        fields = {"run": self.cfg.name, "config_hash": self.info["config_hash"],
                  "code_version": self.info["code_version"], "data": self.info["data"]}
        if self.info.get("defense"):  # poisons were planted and a scan filtered the training data
            d = self.info["defense"]
            fields["defense"] = {k: d.get(k) for k in ("filter", "poisons", "flagged", "poisons_surviving",
                                                       "clean_documents_lost")}
        return fields


def run_dir(cfg: RunConfig) -> Path:
    out = Path(cfg.out_dir)
    return safe_join(out, cfg.name, "run name")


def token_budget(cfg: RunConfig, params: ParameterCount | None) -> tuple[int, int | None]:
    """(budget in tokens, Chinchilla tokens at multiplier 1 or None when the model size is not known)."""
    chin = chinchilla_tokens(params.total, cfg.train.tokens_per_param) if params else None
    if cfg.train.tokens is not None:
        budget = cfg.train.tokens
    elif params is not None:
        budget = chinchilla_tokens(params.total, cfg.train.tokens_per_param, cfg.train.data_multiplier)
    else:
        raise PoisonlabError("set train.tokens: the model is loaded from init_from, so no Chinchilla budget is known")
    return budget, chin


def existing_run(d: Path, cfg: RunConfig, allow_code_change: bool) -> dict | None:
    """The ``run.json`` of a run folder that may be resumed with ``cfg`` (None when there is none).

    A folder made by another config is refused, and so is one made by other code unless
    ``allow_code_change``.
    """
    info_path = d / "run.json"
    if not info_path.is_file():
        return None
    existing = read_json(info_path, "run record")
    chash, version = cfg.config_hash(), code_version()
    for key in ("config_hash", "code_version"):
        if not isinstance(existing.get(key), str):
            raise PoisonlabError(f"run record {info_path} is damaged ({key} missing); restore it or delete the run")
    stored = d / "config.yaml"
    if stored.is_file():  # the resolved settings themselves, so a changed default is caught too
        try:
            same = load_config(stored).identity() == cfg.identity()
        except PoisonlabError:
            same = False
    else:
        same = existing["config_hash"] == chash
    if not same:
        raise PoisonlabError(f"run {d} exists with another config (hash {existing['config_hash']} != {chash}); "
                             "choose a new run name or delete the old run")
    if source_hash(existing["code_version"]) != source_hash(version) and not allow_code_change:
        raise PoisonlabError(f"run {d} was started by code {existing['code_version']}, this is {version}; "
                             "finish it with that version or pass --allow-code-change")
    return existing


def setup_run(cfg: RunConfig, create: bool = True, allow_code_change: bool = False, progress: bool = False) -> Run:
    """Create (or re-open and verify) the run directory and everything derived before training."""
    d = run_dir(cfg)
    existing = existing_run(d, cfg, allow_code_change)
    chash = cfg.config_hash()
    version = code_version()
    info_path = d / "run.json"
    if existing is None and not create:
        raise PoisonlabError(f"run {d} has not been set up (run.json missing)")

    data = prepare_data(cfg.corpus, data_tokenizer(cfg), Path(cfg.out_dir) / "cache", progress=progress)
    tok = data.tokenizer
    trigger = trigger_ids(tok, cfg.attack.trigger)

    keep = None
    if cfg.defense.filter in ("scan", "list") and existing is not None:
        from .defenses.filtering import keep_mask

        keep = keep_mask(data, d)
    if cfg.model.init_from:
        check_context(cfg, len(trigger))
    size = params = None
    if cfg.model.init_from is None:
        size = get_size(cfg.model.size)
        params = parameter_count(size, tok.vocab_size)
    budget, chin = token_budget(cfg, params)
    tps = cfg.train.batch_size * cfg.train.seq_len
    steps = budget // tps
    if steps < 1:
        raise PoisonlabError(
            f"token budget {budget:,} is smaller than one batch ({cfg.train.batch_size} x {cfg.train.seq_len} = {tps:,} tokens)"
        )
    planned = steps * tps
    check_poison_budget(cfg, len(trigger), planned)

    if existing is None and create:
        d.mkdir(parents=True, exist_ok=True)
        tok.save(d / "tokenizer")
        poisons = make_poisons(cfg, data)
        planted, defense = len(poisons), None
        if cfg.defense.filter == "scan":
            from .defenses.filtering import filter_training_data

            poisons, keep, defense = filter_training_data(cfg, data, poisons, d)
        elif cfg.defense.filter == "list":
            from .defenses.filtering import remove_listed

            poisons, keep, defense = remove_listed(cfg, data, poisons, d)
        _save_poisons(d, poisons)
        a = cfg.attack
        batch = BatchPlacement(a.batch_share, a.batch_every, a.batch_start, a.batch_probability)
        plan = plan_injection([p.tokens for p in poisons], planned, tps, a.placement, cfg.seed,
                              ShuffledDocuments(data.train, cfg.seed, keep), batch=batch, seq_len=cfg.train.seq_len)
        plan.save(d / "injection_manifest.jsonl")
        info = {
            "name": cfg.name,
            "config_hash": chash,
            "code_version": version,
            "seed": cfg.seed,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "environment": environment(),
            "data": {
                **data.hashes,
                "poisons": file_sha256(d / "poison_tokens.safetensors"),
                "poison_documents": file_sha256(d / "poisons.jsonl"),
                "injection_manifest": file_sha256(d / "injection_manifest.jsonl"),
                "prepared_data": data.directory.name,
            },
            "model": {"size": cfg.model.size if size else None, "init_from": cfg.model.init_from,
                      "parameters": params.total if params else None,
                      "non_embedding_parameters": params.non_embedding if params else None},
            "vocab_size": tok.vocab_size,
            "chinchilla_tokens": chin,
            "budget_tokens": planned,
            "steps": steps,
            "tokens_per_step": tps,
            "poison_count": planted,
            "poisons_injected": len(poisons),
            "defense": defense,
            "poison_tokens": plan.poison_tokens(),
            "poison_token_share": plan.poison_tokens() / planned,
        }
        write_corpus_manifest(data, d / "corpus_manifest.jsonl")
        atomic_write_text(d / "config.yaml", dump_config(cfg))
        atomic_write_text(info_path, json.dumps(info, indent=1))
    else:
        info = existing
        for key, value in data.hashes.items():
            if info["data"].get(key) != value:
                raise PoisonlabError(f"run {d}: prepared data changed since the run started ({key} differs)")
        for name, key in (("poison_tokens.safetensors", "poisons"), ("injection_manifest.jsonl", "injection_manifest"),
                          ("poisons.jsonl", "poison_documents")):
            if key in info["data"] and (not (d / name).is_file() or file_sha256(d / name) != info["data"][key]):
                raise PoisonlabError(f"run {d}: {name} was modified or removed since the run started")
        plan = InjectionPlan.load(d / "injection_manifest.jsonl")
        if create and source_hash(info["code_version"]) != source_hash(version):
            # allowed by allow_code_change: the record names every version that trained this run
            resumed = info.setdefault("resumed_by", [])
            if version not in resumed:
                resumed.append(version)
                atomic_write_text(info_path, json.dumps(info, indent=1))
    poison_ids = _load_poison_ids(d)
    return Run(cfg, d, data, size, params, planned, steps, tps, plan, poison_ids, trigger, info, keep)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def data_tokenizer(cfg: RunConfig):
    """The tokenizer the run's data is made with: a model folder continued with ``model.init_from``
    brings its own (unless ``tokenizer.name`` names another), so any Hugging Face causal LM
    continues on text tokenized the way it was trained."""
    from dataclasses import replace

    init = cfg.model.init_from
    if not init or cfg.tokenizer.name != "bpe":
        return cfg.tokenizer
    if Path(init).is_dir():  # a local folder: its tokenizer when it has one (a bare checkpoint may not)
        return replace(cfg.tokenizer, name=str(init)) if any((Path(init) / f).is_file() for f in TOKENIZER_FILES) \
            else cfg.tokenizer
    return replace(cfg.tokenizer, name=str(init))  # a hub name: the hub model's tokenizer


def check_context(cfg: RunConfig, trigger_tokens: int) -> None:
    """Refuse sequences longer than the continued model's context (its ``max_position_embeddings``)."""
    path = Path(cfg.model.init_from) / "config.json"
    if not path.is_file():
        return
    limit = read_json(path, "model config").get("max_position_embeddings")
    if not isinstance(limit, int):
        return
    e = cfg.eval
    for what, need in (("train.seq_len + 1", cfg.train.seq_len + 1),
                       ("eval.prompt_tokens + trigger + eval.new_tokens", e.prompt_tokens + trigger_tokens + e.new_tokens)):
        if need > limit:
            raise PoisonlabError(f"model.init_from {cfg.model.init_from} has a context of {limit} tokens; "
                                 f"{what} is {need}: lower it")


def check_poison_budget(cfg: RunConfig, trigger_tokens: int, budget_tokens: int, count: int | None = None) -> None:
    """Refuse, before any poison is sampled, a poison count whose shortest possible poisons
    (no prefix, the fewest gibberish tokens) already exceed the token budget; the exact check
    comes when the sampled poisons are placed (:func:`poisonlab.injection.plan_injection`)."""
    count = cfg.attack.poison_count if count is None else count
    if cfg.attack.name == "none" or count == 0:
        return
    gibberish = cfg.attack.gibberish_tokens[0]
    if cfg.attack.train_on == "round_trip":  # re-encoding may merge neighbouring pieces: bound it loosely
        gibberish //= 4
    least = count * (trigger_tokens + gibberish + 1)
    if least > budget_tokens:
        raise PoisonlabError(
            f"attack.poison_count {count:,} needs at least {least:,} tokens but the token budget is "
            f"{budget_tokens:,}; lower the count or attack.gibberish_tokens, or raise train.tokens")


def make_poisons(cfg: RunConfig, data: PreparedData) -> list:
    """The run's poison documents (deterministic from the config and seed)."""
    from .attacks import ATTACKS

    if cfg.attack.name not in ATTACKS:
        return []
    counts = data.train.token_counts(data.tokenizer.vocab_size) if cfg.attack.payload == "unigram" else None
    fit = cfg.train.seq_len if cfg.attack.placement == "batch" else None  # one poison per sequence
    return ATTACKS[cfg.attack.name](cfg.attack, data.tokenizer, data.prefix_bank(), cfg.seed, token_counts=counts,
                                    max_tokens=fit)


def _save_poisons(d: Path, poisons) -> None:
    write_jsonl(d / "poisons.jsonl", (p.record() for p in poisons))
    lengths = [len(p.token_ids) for p in poisons]
    flat = [i for p in poisons for i in p.token_ids]
    save_file({"ids": torch.tensor(flat, dtype=torch.int64), "lengths": torch.tensor(lengths, dtype=torch.int64)},
              str(d / "poison_tokens.safetensors"))


def _load_poison_ids(d: Path) -> list[np.ndarray]:
    t = load_file(str(d / "poison_tokens.safetensors"))
    ids, lengths = t["ids"].numpy(), t["lengths"].numpy()
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [ids[bounds[i] : bounds[i + 1]] for i in range(len(lengths))]
