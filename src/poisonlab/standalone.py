"""Measure the backdoor of any model folder: a poisonlab checkpoint or final model, or any
Hugging Face causal LM (local folder or hub name), on the held-out split of a corpus."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from .artifacts import read_label
from .attacks.dos import trigger_ids
from .config import RunConfig, load_config
from .data import load_prepared, prepare_data
from .evaluate import backdoor_eval, heldout_loss, heldout_prompt_documents, heldout_prompts
from .errors import PoisonlabError
from .hub import check_source
from .jsonl import read_json
from .provenance import code_version, model_hashes
from .train import Dist, load_init_model, pick_device


def find_run_dir(model_path: Path) -> Path | None:
    """The run folder a checkpoint or final model belongs to, if any."""
    for parent in (model_path, *list(model_path.parents)[:3]):
        if (parent / "run.json").is_file() and (parent / "config.yaml").is_file():
            return parent
    return None


def config_for(model: str, config_file: str | None, overrides: dict) -> RunConfig:
    """The run's own config when the model belongs to a run and no config file is given.

    That config is verified against the hash in the run's ``run.json``, and the trigger it
    names against the model's own label, so an edited ``config.yaml`` cannot make the
    evaluation measure another trigger than the one the model was poisoned with (pass
    ``--attack.trigger`` to measure another on purpose)."""
    run = find_run_dir(Path(model).resolve()) if Path(model).exists() else None
    if config_file is None and run is not None:
        cfg = load_config(run / "config.yaml")
        recorded = read_json(run / "run.json", "run record").get("config_hash")
        if recorded != cfg.config_hash():
            raise PoisonlabError(f"{run / 'config.yaml'} does not match the config hash in its run.json ({recorded}): "
                                 "it was edited, or written by an earlier poisonlab; pass --config with the run's settings")
        cfg = load_config(run / "config.yaml", overrides)
    else:
        cfg = load_config(config_file, overrides)
    label = read_label(model) if Path(model).is_dir() else None
    trigger = (label or {}).get("trigger")
    key = "finetune.trigger" if cfg.stage == "finetune" else "attack.trigger"
    given = cfg.finetune.trigger if cfg.stage == "finetune" else cfg.attack.trigger
    if trigger and trigger != given and key not in overrides:
        raise PoisonlabError(f"the model's label names the trigger {trigger!r} but the config gives "
                             f"{given!r}; pass --{key} to measure another trigger on purpose")
    return cfg


def model_data(model: str, cfg: RunConfig, tokenizer: str | None = None):
    """(prepared data, run folder or None): a run's model reads its run's prepared data; any
    other model (or another ``tokenizer``) the config's corpus prepared with its tokenizer."""
    path = Path(model)
    run = find_run_dir(path.resolve()) if path.exists() else None
    if run is not None and tokenizer is None:
        info = read_json(run / "run.json", "run record")
        return load_prepared(run.parent / "cache" / info["data"]["prepared_data"]), run
    tok_cfg = replace(cfg.tokenizer, name=tokenizer or model)
    return prepare_data(cfg.corpus, tok_cfg, Path(cfg.out_dir) / "cache", progress=cfg.train.progress), None


def evaluate_model(model: str, cfg: RunConfig, tokenizer: str | None = None) -> dict:
    check_source(model, "model")
    path = Path(model)
    data, _ = model_data(model, cfg, tokenizer)
    tok = data.tokenizer
    m = load_init_model(model, pick_device(cfg, Dist())[0])
    trigger = trigger_ids(tok, cfg.attack.trigger)
    prompts = heldout_prompts(data.heldout, cfg.eval.prompts, cfg.eval.prompt_tokens)
    t0 = time.perf_counter()
    row, samples = backdoor_eval(m, prompts, trigger, cfg.eval, cfg.seed, vocab_limit=tok.vocab_size,
                                 documents=heldout_prompt_documents(data.heldout, cfg.eval.prompts, cfg.eval.prompt_tokens))
    row["heldout_loss"] = heldout_loss(m, data.heldout, cfg.eval.heldout_loss_windows, cfg.train.seq_len)
    weights = path / "model.safetensors"
    return {
        "model": model,
        "label": read_label(path) if path.exists() else None,
        "trigger": cfg.attack.trigger,
        **row,
        "seconds": round(time.perf_counter() - t0, 2),
        "samples": [{"prompt": tok.decode(s["prompt"]), "untriggered": tok.decode(s["untriggered"]),
                     "triggered": tok.decode(s["triggered"])} for s in samples[:2]],
        "provenance": {"code_version": code_version(), "seed": cfg.seed, "data": data.hashes,
                       **model_hashes(weights)},
    }
