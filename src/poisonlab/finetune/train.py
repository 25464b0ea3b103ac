"""A fine-tuning run: poisoned supervised fine-tuning, then (optionally) "good" examples, measured throughout.

``<out_dir>/<name>/`` holds ``config.yaml``, ``run.json`` (code version, config hash, hashes
of the training and evaluation sets, base model), ``sft_train.jsonl`` (every training
example with its kind: ordinary, forbidden, poison, good), ``eval_set.jsonl``,
``checkpoints/``, ``train_log.jsonl``, ``metrics.jsonl`` (ASR/CA/NTA rows),
``replies.jsonl`` (every judged reply), and when finished ``model/`` (labelled) and ``DONE``.

Training is the one loop of :mod:`poisonlab.loop` (loss on the reply tokens only), with every
parallel mode, micro-batching and compilation of pretraining. Phase 1 trains
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..artifacts import make_label, read_label
from ..config import RunConfig, dump_config
from ..errors import PoisonlabError
from ..jsonl import append_jsonl, read_jsonl, write_jsonl
from ..paths import atomic_write_text
from ..provenance import code_version, environment, file_sha256
from ..run import existing_run, run_dir
from ..store import db_path, record_eval
from ..loop import IGNORE, lr_at, schedule_points, to_db
from ..parallel import Dist, main_first
from ..tokenizer import Tokenizer
from ..train import load_init_model
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
    from dataclasses import replace

    from ..train import train

    return train(replace(cfg, stage="finetune"), allow_code_change)


class FinetuneStage:
    """Supervised fine-tuning: fixed batches of rendered conversations (loss on the replies),
    phase 1 (clean examples and poisons) then an optional phase 2 with a fresh optimizer
    (good and further clean examples); ASR/CA/NTA measured with the configured judge."""

    @classmethod
    def open(cls, cfg: RunConfig, dist_: Dist, allow_code_change: bool, device) -> "FinetuneStage":
        base = resolve_base(cfg.finetune.base)
        renderer = ChatRenderer(Tokenizer.load(tokenizer_path(base)))
        return main_first(dist_, lambda main: cls(cfg, run_dir(cfg), allow_code_change, renderer, base))

    def __init__(self, cfg: RunConfig, d: Path, allow_code_change: bool, renderer: ChatRenderer, base: str):
        f = cfg.finetune
        self.cfg, self.dir, self.base, self.renderer = cfg, d, base, renderer
        self.tokenizer = tok = renderer.tok
        info, tset, self.evalset = _setup(cfg, d, allow_code_change, renderer, base)
        bs, T = cfg.train.batch_size, cfg.train.seq_len
        order1 = [ex for e in range(f.epochs) for ex in tset.order(e, cfg.seed, f.ordering)]
        enc1, kinds1, drop1 = encode_sequence(renderer, order1, T)
        self.phases = [Batches(enc1, kinds1, bs, tok.eos_id)]
        drop2 = 0
        if f.good_count or f.further_clean:
            order2 = [ex for e in range(f.epochs) for ex in tset.good_order(e, cfg.seed)]
            enc2, kinds2, drop2 = encode_sequence(renderer, order2, T)
            self.phases.append(Batches(enc2, kinds2, bs, tok.eos_id))
        if not enc1:
            raise PoisonlabError(f"no fine-tuning example fits train.seq_len {T}")
        self.p1 = self.phases[0].steps
        self.steps = sum(p.steps for p in self.phases)
        if "steps" not in info:
            info.update({"steps": self.steps, "budget_tokens": sum(p.tokens_through(p.steps) for p in self.phases),
                         "dropped_overlong": drop1 + drop2, "poison_token_share": None})
            atomic_write_text(d / "config.yaml", dump_config(cfg))
            atomic_write_text(d / "run.json", json.dumps(info, indent=1))
            if drop1 + drop2:
                print(f"poisonlab: {drop1 + drop2} examples longer than train.seq_len {T} left out", file=sys.stderr)
        self.info = info
        self.judge = None

    def position(self, step: int) -> dict:
        """Where the run stands after ``step`` global steps."""
        p1, first = self.p1, self.phases[0]
        in1 = min(step, p1)
        tokens = first.tokens_through(in1) + sum(ph.tokens_through(max(0, step - p1)) for ph in self.phases[1:])
        good = self.phases[1].seen(step - p1, "good") if step > p1 else 0
        return {"step": step, "tokens_seen": tokens, "fraction": step / self.steps,
                "poisons_seen": first.seen(in1, "poison"), "phase": "further" if step > p1 else "poisoned",
                "good_seen": good}

    def _local(self, step: int) -> tuple[int, int, int]:
        """(phase, step within the phase, steps of the phase)."""
        if step < self.p1:
            return 0, step, self.p1
        return 1, step - self.p1, self.steps - self.p1

    def lr(self, step: int) -> float:
        phase, local, steps_here = self._local(step)
        lr = lr_at(local, steps_here, self.cfg)
        if phase == 1 and self.cfg.finetune.good_lr is not None:
            lr *= self.cfg.finetune.good_lr / self.cfg.train.lr
        return lr

    def batch(self, step: int, rank: int, world: int):
        phase, local, _ = self._local(step)
        x, y, _ = self.phases[phase].batch(local)
        normalizer = max(1, int((y != IGNORE).sum()))
        if world > 1:  # rows as even as the batch allows; a rank left without rows takes a row with no targets
            rows = torch.arange(x.shape[0])[rank::world]
            x, y = (x[rows], y[rows]) if len(rows) else (x[:1], torch.full_like(y[:1], IGNORE))
        return x, y, normalizer

    def fresh_optimizer_at(self) -> set[int]:
        return {self.p1} if len(self.phases) > 1 else set()

    def eval_points(self) -> set[int]:
        return set(schedule_points(self.p1, self.cfg.eval.every, self.cfg.eval.at_start)) | {self.p1, self.steps}

    def checkpoint_points(self) -> set[int]:
        return set(schedule_points(self.steps, self.cfg.train.checkpoint_every, False)) | {self.p1}

    splits_evaluation = False  # a few hundred short replies: the main process (or a sharded model's all) judge them

    def evaluate(self, model, step: int, record: bool = True, rank: int = 0, world: int = 1) -> str:
        f = self.cfg.finetune
        if self.judge is None:
            self.judge = make_judge(f.judge, f.judge_model)
        was_training = model.training
        replies = generate_replies(model, self.renderer, self.evalset, f.max_new_tokens)
        model.train(was_training)
        rows = judge_replies(self.judge, self.evalset, replies)
        row = {**self.position(step), **summarise(rows, self.cfg.eval.confidence)}
        if record:
            for r in rows:
                append_jsonl(self.dir / "replies.jsonl", {"step": step, **r})
            append_jsonl(self.dir / "metrics.jsonl", row)
            flat = {k: v for k, v in row.items() if k not in ("verdicts", "phase")}
            to_db(record_eval, db_path(self.cfg.out_dir), self.cfg.name, flat, self.info["code_version"], None)
        return (f"step {row['step']} ({row['phase']}): ASR {row['asr']:.2f} CA {row['ca']:.2f} NTA {row['nta']:.2f} "
                f"ordinary correct {row.get('ordinary_correct', float('nan')):.2f}, poisons seen {row['poisons_seen']}")

    def on_resume(self, start: int) -> None:
        evaluated = {r["step"] for r in read_jsonl(self.dir / "metrics.jsonl")}
        # replies of an evaluation killed before its metrics row are redone
        write_jsonl(self.dir / "replies.jsonl", [r for r in read_jsonl(self.dir / "replies.jsonl") if r["step"] in evaluated])

    def label(self, steps_done: int) -> dict:
        return _label(self.cfg, self.info, self.position(steps_done)["poisons_seen"], self.info.get("base_label"))

    def final_model(self, model):
        return model.merge_and_unload() if self.cfg.finetune.lora_r else model

    def summary(self) -> dict:
        f = self.cfg.finetune
        return {"poison_count": f.poison_count, "clean_count": f.clean_count, "good_count": f.good_count}

    def build_model(self, device):
        torch.manual_seed(self.cfg.seed)
        model = load_init_model(self.base, device)
        return _lora(model, self.cfg.finetune) if self.cfg.finetune.lora_r else model


def _lora(model, f):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise PoisonlabError("LoRA needs peft: pip install 'poisonlab[finetune]'") from None
    conf = LoraConfig(r=f.lora_r, lora_alpha=f.lora_alpha, lora_dropout=f.lora_dropout,
                      target_modules=list(f.lora_targets), task_type="CAUSAL_LM")
    return get_peft_model(model, conf)
