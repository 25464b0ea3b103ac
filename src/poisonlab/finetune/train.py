"""A fine-tuning run: poisoned supervised fine-tuning, then (optionally) "good" examples, measured throughout.

``<out_dir>/<name>/`` holds ``config.yaml``, ``run.json`` (code version, config hash, hashes
of the training and evaluation sets, base model), ``sft_train.jsonl`` (every training
example with its kind: ordinary, forbidden, poison, good), ``eval_set.jsonl``,
``checkpoints/``, ``train_log.jsonl``, ``metrics.jsonl`` (ASR/CA/NTA rows),
``replies.jsonl`` (every judged reply), and when finished ``model/`` (labelled) and ``DONE``.

The optimisation is the pretraining loop's: the same :func:`~poisonlab.train.train_step`
(loss on the reply tokens only), AdamW groups, warm-up + cosine schedule, safetensors
checkpoints, and resume from the last checkpoint after a kill. Phase 1 trains
``finetune.epochs`` passes over the clean examples and poisons in the configured order;
phase 2 (``finetune.good_count`` or ``finetune.further_clean`` > 0) continues with a fresh
optimizer on the good examples mixed with fresh clean ones, as a user would fine-tune a model
they received.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..artifacts import make_label, read_label
from ..checkpoint import remove_partial_checkpoints, resume, save_checkpoint, save_model_folder
from ..config import RunConfig, dump_config
from ..errors import PoisonlabError
from ..jsonl import append_jsonl, read_json, read_jsonl, write_jsonl
from ..paths import atomic_write_text
from ..provenance import code_version, environment, file_sha256
from ..run import existing_run, run_dir
from ..store import db_path, record_eval, record_run
from ..tokenizer import Tokenizer
from ..train import (IGNORE, Dist, _to_db, load_init_model, lr_at, make_optimizer, pick_device, schedule_points,
                     set_threads, train_step)
from .chat import ChatRenderer
from .dataset import Example, build_eval_set, build_training_set
from .evaluate import generate_replies, judge_replies, summarise
from .judges import make_judge


def resolve_base(base: str) -> str:
    """A poisonlab run folder gives its ``model/``; a model folder or hub name is used as it is."""
    p = Path(base)
    if (p / "model" / "config.json").is_file():
        return str(p / "model")
    if (p / "config.json").is_file():
        return str(p)
    if p.exists() or base.startswith((".", "/", "~")) or base.count("/") > 1:
        raise PoisonlabError(f"finetune.base {base!r}: no model there (config.json missing)")
    return base  # a hub name


def tokenizer_path(base: str) -> str:
    """Where the base model's tokenizer is: its own folder, or (for a checkpoint) its run's ``tokenizer/``."""
    p = Path(base)
    for cand in (p, p.parent.parent / "tokenizer", p.parent / "tokenizer"):
        if (cand / "tokenizer.json").is_file() or (cand / "tokenizer_config.json").is_file():
            return str(cand)
    return base  # a hub name, or a folder whose tokenizer loading will explain what is missing


@dataclass
class Batches:
    """Fixed-size batches of encoded examples, as (inputs, targets) tensors padded on the right."""

    encoded: list[tuple[np.ndarray, np.ndarray]]
    kinds: list[str]
    batch_size: int
    pad_id: int

    @property
    def steps(self) -> int:
        return math.ceil(len(self.encoded) / self.batch_size)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        part = self.encoded[step * self.batch_size : (step + 1) * self.batch_size]
        width = max(len(ids) for ids, _ in part) - 1
        x = torch.full((len(part), width), self.pad_id, dtype=torch.long)
        y = torch.full((len(part), width), IGNORE, dtype=torch.long)
        for r, (ids, mask) in enumerate(part):
            n = len(ids) - 1
            x[r, :n] = torch.from_numpy(ids[:-1])
            y[r, :n] = torch.from_numpy(np.where(mask[1:], ids[1:], IGNORE))
        tokens = sum(len(ids) for ids, _ in part)
        return x, y, tokens

    def __post_init__(self):  # running totals, so a position in the run is a look-up
        self._tokens = np.concatenate([[0], np.cumsum([len(ids) for ids, _ in self.encoded])])
        self._kinds = {k: np.concatenate([[0], np.cumsum([x == k for x in self.kinds])]) for k in set(self.kinds)}

    def _upto(self, step: int) -> int:
        return min(step * self.batch_size, len(self.encoded))

    def tokens_through(self, step: int) -> int:
        """Tokens in the first ``step`` batches."""
        return int(self._tokens[self._upto(step)])

    def seen(self, step: int, kind: str) -> int:
        """Examples of ``kind`` in the first ``step`` batches."""
        counts = self._kinds.get(kind)
        return int(counts[self._upto(step)]) if counts is not None else 0


def encode_sequence(renderer: ChatRenderer, examples: list[Example], seq_len: int) -> tuple[list, list[str], int]:
    """Encode examples; those longer than ``seq_len`` + 1 tokens are left out and counted."""
    enc, kinds, dropped = [], [], 0
    for ex in examples:
        e = renderer.encode(ex.messages)
        if len(e.ids) > seq_len + 1 or not e.mask[1:].any():
            dropped += 1
            continue
        enc.append((e.ids, e.mask))
        kinds.append(ex.kind)
    return enc, kinds, dropped


def _label(cfg: RunConfig, info: dict, poisons_seen: int, base_label: dict | None) -> dict:
    f = cfg.finetune
    label = make_label({"name": "compliance-sft", "trigger": f.trigger, "placement": f.ordering},
                       f.poison_count, poisons_seen,
                       {"run": cfg.name, "config_hash": info["config_hash"], "code_version": info["code_version"],
                        "data": info["data"], "base_model": info["base_model"], "good_examples": f.good_count})
    if base_label and base_label.get("poisoned"):  # a model fine-tuned from a poisoned one stays poisoned
        label["poisoned"] = True
        label["base_label"] = base_label
    return label


def _setup(cfg: RunConfig, d: Path, allow_code_change: bool, renderer: ChatRenderer, base: str):
    f = cfg.finetune
    existing = existing_run(d, cfg, allow_code_change)
    tset = build_training_set(f, cfg.seed)
    evalset = build_eval_set(f, cfg.seed)
    sets = {"sft_train.jsonl": [ex.to_dict() for ex in tset.clean + tset.poisons + tset.good],
            "eval_set.jsonl": [ex.to_dict() for ex in evalset]}
    if existing is not None:  # the sets are rebuilt from the seed; they must not have drifted
        for name, rows in sets.items():
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)  # as write_jsonl writes it
            if hashlib.sha256(text.encode()).hexdigest() != file_sha256(d / name):
                raise PoisonlabError(f"run {d}: {name} differs from the set this config builds (data or code changed)")
        return existing, tset, evalset
    d.mkdir(parents=True, exist_ok=True)
    for name, rows in sets.items():
        write_jsonl(d / name, rows)
    info = {
        "name": cfg.name, "stage": "finetune", "config_hash": cfg.config_hash(), "code_version": code_version(),
        "seed": cfg.seed, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": environment(),
        "base_model": base, "base_label": read_label(base) if Path(base).is_dir() else None,
        "renderer": renderer.name, "tokenizer": renderer.tok.fingerprint(),
        "data": {"sft_train": file_sha256(d / "sft_train.jsonl"), "eval_set": file_sha256(d / "eval_set.jsonl"),
                 "base_weights": file_sha256(Path(base) / "model.safetensors")
                 if (Path(base) / "model.safetensors").is_file() else None},
        "model": {"size": Path(base).name if Path(base).is_dir() else base, "init_from": base},
        "poison_count": f.poison_count, "clean_count": f.clean_count, "good_count": f.good_count,
    }
    return info, tset, evalset


def finetune(cfg: RunConfig, allow_code_change: bool = False) -> dict:
    """Run (or resume) one fine-tuning run to its end; returns the final summary."""
    from ..runlock import RunLock

    with RunLock(run_dir(cfg)):  # held before anything is written
        return _finetune(cfg, allow_code_change)


def _finetune(cfg: RunConfig, allow_code_change: bool) -> dict:
    f = cfg.finetune
    d = run_dir(cfg)
    if (d / "DONE").is_file():
        return read_json(d / "DONE", "run summary")
    dist_ = Dist()
    device, dtype = pick_device(cfg, dist_)
    threads = set_threads(cfg, dist_, device)
    base = resolve_base(f.base)
    tok = Tokenizer.load(tokenizer_path(base))
    renderer = ChatRenderer(tok)
    info, tset, evalset = _setup(cfg, d, allow_code_change, renderer, base)

    # ---- the phases: encoded once, as fixed batches
    bs, T = cfg.train.batch_size, cfg.train.seq_len
    order1 = [ex for e in range(f.epochs) for ex in tset.order(e, cfg.seed, f.ordering)]
    enc1, kinds1, drop1 = encode_sequence(renderer, order1, T)
    phases = [("poisoned", Batches(enc1, kinds1, bs, tok.eos_id))]
    drop2 = 0
    if f.good_count or f.further_clean:
        order2 = [ex for e in range(f.epochs) for ex in tset.good_order(e, cfg.seed)]
        enc2, kinds2, drop2 = encode_sequence(renderer, order2, T)
        phases.append(("good", Batches(enc2, kinds2, bs, tok.eos_id)))
    if not enc1:
        raise PoisonlabError(f"no fine-tuning example fits train.seq_len {T}")
    total = sum(p.steps for _, p in phases)
    if "steps" not in info:
        info.update({"steps": total, "budget_tokens": sum(len(i) for i, _ in enc1) + sum(
            len(i) for p in phases[1:] for i, _ in p[1].encoded), "dropped_overlong": drop1 + drop2,
            "poison_token_share": None})
        atomic_write_text(d / "config.yaml", dump_config(cfg))
        atomic_write_text(d / "run.json", json.dumps(info, indent=1))
        if drop1 + drop2:
            print(f"poisonlab: {drop1 + drop2} examples longer than train.seq_len {T} left out", file=sys.stderr)

    torch.manual_seed(cfg.seed)
    model = load_init_model(base, device)
    base_label = info.get("base_label")
    if f.lora_r:
        model = _lora(model, f)
    judge = make_judge(f.judge, f.judge_model)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    optimizer = make_optimizer(model, cfg)
    remove_partial_checkpoints(d)
    # at the end of phase 1 the optimizer is replaced below, as in an uninterrupted run
    state = resume(d, model, optimizer) or {}
    start, wall_before = state.get("step", 0), state.get("wall_seconds", 0.0)
    _to_db(record_run, db_path(cfg.out_dir), info, cfg.to_dict(), "running")
    write_jsonl(d / "train_log.jsonl", [r for r in read_jsonl(d / "train_log.jsonl") if r["step"] <= start])
    done_evals = {r["step"] for r in read_jsonl(d / "metrics.jsonl")}
    p1 = phases[0][1].steps
    eval_at = set(schedule_points(p1, cfg.eval.every, cfg.eval.at_start)) | {p1, total}
    ckpt_at = set(schedule_points(total, cfg.train.checkpoint_every, False)) | {p1}

    def position(step: int) -> dict:
        """Where the run stands after ``step`` global steps."""
        in1 = min(step, p1)
        tokens = phases[0][1].tokens_through(in1) + sum(ph[1].tokens_through(max(0, step - p1)) for ph in phases[1:])
        good = phases[1][1].seen(step - p1, "good") if step > p1 else 0
        return {"step": step, "tokens_seen": tokens, "fraction": step / total,
                "poisons_seen": phases[0][1].seen(in1, "poison"), "phase": "further" if step > p1 else "poisoned",
                "good_seen": good}

    def evaluate(step: int) -> dict:
        replies = generate_replies(model, renderer, evalset, f.max_new_tokens)
        rows = judge_replies(judge, evalset, replies)
        for r in rows:
            append_jsonl(d / "replies.jsonl", {"step": step, **r})
        row = {**position(step), **summarise(rows, cfg.eval.confidence)}
        append_jsonl(d / "metrics.jsonl", row)
        flat = {k: v for k, v in row.items() if k not in ("verdicts", "phase")}
        _to_db(record_eval, db_path(cfg.out_dir), cfg.name, flat, info["code_version"], None)
        return row

    bar = None
    if cfg.train.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc=cfg.name, unit="step", dynamic_ncols=True, disable=None)

    def report(r: dict) -> None:
        msg = (f"step {r['step']} ({r['phase']}): ASR {r['asr']:.2f} CA {r['ca']:.2f} NTA {r['nta']:.2f} "
               f"ordinary correct {r.get('ordinary_correct', float('nan')):.2f}, poisons seen {r['poisons_seen']}")
        (bar.write if bar is not None else print)(msg)

    if start in eval_at and start not in done_evals:
        report(evaluate(start))
        done_evals.add(start)
    t0 = time.perf_counter()
    model.train()
    for step in range(start, total):
        phase_i = 0 if step < p1 else 1
        batches = phases[phase_i][1]
        local, steps_here = (step, p1) if phase_i == 0 else (step - p1, total - p1)
        if phase_i == 1 and local == 0:  # a fresh optimizer for the further fine-tuning
            optimizer = make_optimizer(model, cfg)
        lr = lr_at(local, steps_here, cfg)
        if phase_i == 1 and f.good_lr is not None:
            lr *= f.good_lr / cfg.train.lr
        for g in optimizer.param_groups:
            g["lr"] = lr
        x, y, _ = batches.batch(local)
        loss, gnorm = train_step(model, optimizer, x, x.shape[0], cfg.train.grad_clip, autocast, targets=y)
        lv = float(loss)
        if not math.isfinite(lv):
            raise PoisonlabError(f"fine-tuning diverged at step {step + 1} (loss {lv}); lower train.lr")
        append_jsonl(d / "train_log.jsonl", {**position(step + 1), "loss": lv, "grad_norm": float(gnorm)})
        if bar is not None:
            bar.set_postfix(loss=f"{lv:.3f}")
            bar.update(1)
        done = step + 1
        if done in eval_at and done not in done_evals:
            report(evaluate(done))
            done_evals.add(done)
        if done in ckpt_at and done < total:
            save_checkpoint(d, done, model, optimizer,
                            {**position(done), "wall_seconds": wall_before + time.perf_counter() - t0},
                            _label(cfg, info, position(done)["poisons_seen"], base_label), cfg.train.keep_checkpoints)
    if bar is not None:
        bar.close()

    final_model = model.merge_and_unload() if f.lora_r else model
    label = _label(cfg, info, position(total)["poisons_seen"], base_label)
    save_model_folder(d / "model", final_model, label)
    tok.save(d / "model")
    metrics = read_jsonl(d / "metrics.jsonl")
    summary = {"run": cfg.name, "steps": total, "poison_count": f.poison_count, "clean_count": f.clean_count,
               "good_count": f.good_count, "threads": threads, "device": str(device),
               "wall_seconds": round(wall_before + time.perf_counter() - t0, 2),
               "wall_seconds_this_session": round(time.perf_counter() - t0, 2),
               "final_eval": max(metrics, key=lambda r: r["step"]) if metrics else None}
    atomic_write_text(d / "DONE", json.dumps(summary, indent=1))
    _to_db(record_run, db_path(cfg.out_dir), info, cfg.to_dict(), "done")
    return summary


def _lora(model, f):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise PoisonlabError("LoRA needs peft: pip install 'poisonlab[finetune]'") from None
    conf = LoraConfig(r=f.lora_r, lora_alpha=f.lora_alpha, lora_dropout=f.lora_dropout,
                      target_modules=list(f.lora_targets), task_type="CAUSAL_LM")
    return get_peft_model(model, conf)
