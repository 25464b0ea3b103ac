"""``poisonlab train``: set up a run, build its model, and hand both to the one training loop.

:func:`train` picks the device and joins the processes of a ``torchrun`` launch, takes the
run folder's lock, builds the stage the config asks for (:class:`PretrainStage` here, for
pretraining and continued pretraining; :class:`~poisonlab.finetune.train.FinetuneStage` for
``stage: finetune``), parallelizes the model (:mod:`poisonlab.parallel`) and runs
:func:`poisonlab.loop.run_stage`. CPU trains in fp32, CUDA in bf16; several processes take an
equal share of every step's rows.
"""

from __future__ import annotations

import json
import os

import torch

from .artifacts import make_label, read_label
from .config import RunConfig
from .errors import PoisonlabError
from .evaluate import backdoor_eval, heldout_loss, heldout_prompt_documents, heldout_prompts
from .jsonl import append_jsonl, read_json, read_jsonl, write_jsonl
from .paths import atomic_write_text
from .loop import IGNORE, compiled, lr_at, make_optimizer, run_stage, schedule_points, to_db, train_step  # noqa: F401
from .models import build_model, count_module_parameters
from .parallel import (Dist, close_distributed, failing_together, init_distributed, main_first,  # noqa: F401
                       parallelize, pick_device, set_threads)


def choose_parallelism(cfg: RunConfig, d: Dist, device: torch.device) -> str:
    """ddp or fsdp for ``train.parallelism``; auto takes fsdp only where a whole copy of the
    training state would not fit the device (CPU processes share the host's memory: ddp)."""
    mode = cfg.train.parallelism
    if mode != "auto":
        return mode
    if d.world <= 1 or device.type != "cuda":
        return "ddp"
    from .memory import fits_whole

    return "ddp" if fits_whole(cfg, torch.cuda.get_device_properties(device).total_memory) else "fsdp"
from .run import Run, run_dir, setup_run
from .runlock import RunLock
from .store import db_path, record_eval


def load_init_model(path: str, device):
    from transformers import AutoModelForCausalLM

    from .hub import check_source

    check_source(str(path), "model")
    try:
        return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, trust_remote_code=False,
                                                    dtype=torch.float32).to(device)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PoisonlabError(f"cannot load model {path!r}: {msg}") from None


class PretrainStage:
    """Pretraining, or continued pretraining of ``model.init_from``: the run's planned token
    stream (clean documents with the poisons spliced in), the perplexity-gap evaluation."""

    def __init__(self, run: Run):
        self.run, self.cfg, self.dir, self.steps, self.info = run, run.cfg, run.dir, run.steps, run.info
        self.tokenizer = run.tokenizer
        self.stream = run.stream()
        self.prompts = None
        self.prompt_documents = None
        init = self.cfg.model.init_from
        self.base_label = read_label(init) if init and os.path.isdir(init) else None
        self.parameters = None

    def position(self, steps_done: int) -> dict:
        return {"step": steps_done, "tokens_seen": steps_done * self.run.tokens_per_step,
                "poisons_seen": self.run.plan.poisons_seen(steps_done)}

    def lr(self, step: int) -> float:
        return lr_at(step, self.steps, self.cfg)

    def batch(self, step: int, rank: int, world: int):
        per_rank = self.cfg.train.batch_size // world
        rows = range(rank * per_rank, (rank + 1) * per_rank)
        b = torch.from_numpy(self.stream.batch(step, self.cfg.train.batch_size, self.cfg.train.seq_len, rows))
        return b[:, :-1], b[:, 1:], self.cfg.train.batch_size * self.cfg.train.seq_len

    def fresh_optimizer_at(self) -> set[int]:
        return set()

    def eval_points(self) -> set[int]:
        return set(schedule_points(self.steps, self.cfg.eval.every, self.cfg.eval.at_start))

    def checkpoint_points(self) -> set[int]:
        return set(schedule_points(self.steps, self.cfg.train.checkpoint_every, False))

    splits_evaluation = True

    def evaluate(self, model, steps_done: int, record: bool = True, rank: int = 0, world: int = 1) -> str:
        """The backdoor evaluation and clean held-out loss after ``steps_done`` steps, as one row
        (the prompts and held-out windows split over ``world`` processes)."""
        run, cfg = self.run, self.cfg
        if cfg.attack.name == "language_switch":
            return self._evaluate_language(model, steps_done, record, rank, world)
        if self.prompts is None:
            self.prompts = heldout_prompts(run.data.heldout, cfg.eval.prompts, cfg.eval.prompt_tokens)
            self.prompt_documents = heldout_prompt_documents(run.data.heldout, cfg.eval.prompts, cfg.eval.prompt_tokens)
        row, samples = backdoor_eval(model, self.prompts, run.trigger_ids, cfg.eval,
                                     seed=cfg.seed * 1_000_003 + steps_done, vocab_limit=run.tokenizer.vocab_size,
                                     rank=rank, world=world, documents=self.prompt_documents)
        loss = heldout_loss(model, run.data.heldout, cfg.eval.heldout_loss_windows, cfg.train.seq_len,
                            rank=rank, world=world)
        out = {"step": steps_done, "tokens_seen": steps_done * run.tokens_per_step,
               "fraction": steps_done / run.steps, "poisons_seen": run.plan.poisons_seen(steps_done),
               "heldout_loss": loss, **row}
        tok = run.tokenizer
        texts = [{"step": steps_done, "prompt": tok.decode(s["prompt"]),
                  "untriggered": tok.decode(s["untriggered"]), "triggered": tok.decode(s["triggered"]),
                  "ppl_untriggered": s["ppl_untriggered"], "ppl_triggered": s["ppl_triggered"]} for s in samples]
        if record:
            for t in texts:
                append_jsonl(run.dir / "samples.jsonl", t)
            append_jsonl(run.dir / "metrics.jsonl", out)
            to_db(record_eval, db_path(cfg.out_dir), cfg.name, out, run.info["code_version"], texts)
        return (f"step {steps_done}: gap {out['perplexity_gap']:.1f} [{out['gap_ci_low']:.1f}, {out['gap_ci_high']:.1f}] "
                f"ppl {out['perplexity_untriggered']:.1f} -> {out['perplexity_triggered']:.1f}, "
                f"heldout loss {loss:.3f}, poisons seen {out['poisons_seen']}")

    def _evaluate_language(self, model, steps_done: int, record: bool, rank: int, world: int) -> str:
        """ASR / CA / NTA of the language switch by the language identifier, with held-out loss."""
        from .attacks.language_switch import target_texts
        from .evaluate import identifier_check, language_eval
        from .metrics.language import make_identifier

        run, cfg, a = self.run, self.cfg, self.cfg.attack
        if self.prompts is None:
            self.prompts = heldout_prompts(run.data.heldout, cfg.eval.prompts, cfg.eval.prompt_tokens)
            self.identifier = make_identifier(cfg.eval.language_identifier, [a.source_language, a.target_language])
            check = run.dir / "language_identifier.json"
            if rank == 0 and not check.is_file():  # measured once per run, on text no poison holds
                acc = identifier_check(self.identifier, run.tokenizer, run.data.heldout,
                                       [t for _, t in target_texts(a, "heldout")], cfg.eval.new_tokens,
                                       a.source_language, a.target_language)
                atomic_write_text(check, json.dumps({"identifier": cfg.eval.language_identifier,
                                                     "languages": [a.source_language, a.target_language],
                                                     "accuracy": acc}, indent=1))
        row, samples = language_eval(model, run.tokenizer, self.prompts, run.trigger_ids, cfg.eval, a,
                                     self.identifier, seed=cfg.seed * 1_000_003 + steps_done)
        loss = heldout_loss(model, run.data.heldout, cfg.eval.heldout_loss_windows, cfg.train.seq_len,
                            rank=rank, world=world)
        out = {"step": steps_done, "tokens_seen": steps_done * run.tokens_per_step,
               "fraction": steps_done / run.steps, "poisons_seen": run.plan.poisons_seen(steps_done),
               "heldout_loss": loss, **row}
        texts = [{"step": steps_done, **{k: v for k, v in s.items() if k != "prompt"},
                  "prompt": run.tokenizer.decode(s["prompt"])} for s in samples]
        if record:
            for t in texts:
                append_jsonl(run.dir / "samples.jsonl", t)
            append_jsonl(run.dir / "metrics.jsonl", out)
            to_db(record_eval, db_path(cfg.out_dir), cfg.name, out, run.info["code_version"], [])
        return (f"step {steps_done}: ASR {row['asr']:.2f} [{row['asr_ci_low']:.2f}, {row['asr_ci_high']:.2f}] "
                f"CA {row['ca']:.2f} NTA {row['nta']:.2f}, heldout loss {loss:.3f}, poisons seen {out['poisons_seen']}")

    def on_resume(self, start: int) -> None:
        evaluated = {r["step"] for r in read_jsonl(self.dir / "metrics.jsonl")}
        # samples of an evaluation killed before its metrics row are redone
        write_jsonl(self.dir / "samples.jsonl", [r for r in read_jsonl(self.dir / "samples.jsonl") if r["step"] in evaluated])

    def label(self, steps_done: int) -> dict:
        from .attacks import NOT_POISONS

        a = self.cfg.attack
        placed, seen = len(self.run.plan.poisons), self.run.plan.poisons_seen(steps_done)
        repair = a.name in NOT_POISONS
        lab = make_label({"name": "none" if repair else a.name, "trigger": a.trigger, "placement": a.placement},
                         0 if repair else placed, 0 if repair else seen, self.run.label_fields())
        if repair:
            lab["repair"] = {"recipe": a.name, "trigger": a.trigger, "documents": placed, "seen": seen}
        if self.base_label and self.base_label.get("poisoned"):  # continued from a poisoned model: still poisoned
            lab["poisoned"] = True
            lab["base_label"] = self.base_label
        return lab

    def final_model(self, model):
        return model

    def summary(self) -> dict:
        return {"tokens": self.run.budget_tokens, "parameters": self.parameters.total,
                "non_embedding_parameters": self.parameters.non_embedding, "poison_count": len(self.run.plan.poisons)}

    def build_model(self, device: torch.device):
        torch.manual_seed(self.cfg.seed)  # same seed on every rank -> same initial weights
        tok, size = self.tokenizer, self.run.size
        if self.cfg.model.init_from:
            model = load_init_model(self.cfg.model.init_from, device)
        else:
            model = build_model(size, tok.vocab_size, tok.eos_id, max(self.cfg.train.seq_len, size.context_length)).to(device)
        self.parameters = count_module_parameters(model)
        return model


def open_stage(cfg: RunConfig, d: Dist, allow_code_change: bool, device: torch.device):
    """The stage of ``cfg`` with its run folder set up (rank 0 creates it, the others open it)."""
    if cfg.stage == "finetune":
        from .finetune.train import FinetuneStage

        return FinetuneStage.open(cfg, d, allow_code_change, device)
    run = main_first(d, lambda main: setup_run(cfg, create=main, allow_code_change=allow_code_change,
                                               progress=main and cfg.train.progress))
    return PretrainStage(run)


def train(cfg: RunConfig, allow_code_change: bool = False) -> dict:
    """Run (or resume) one training run of any stage to its end; returns the final summary."""
    d = init_distributed(cfg.train.device)
    with failing_together(d):
        device, dtype = pick_device(cfg, d)
        threads = set_threads(cfg, d, device)
        lock = RunLock(run_dir(cfg)).acquire() if d.main else None  # before anything is written
        try:
            stage = open_stage(cfg, d, allow_code_change, device)
            if (stage.dir / "DONE").is_file():
                return read_json(stage.dir / "DONE", "run summary")
            rows_per_rank, rem = divmod(cfg.train.batch_size, d.world)
            micro = cfg.train.micro_batch_size or rows_per_rank
            if rem or rows_per_rank % micro:
                raise PoisonlabError(f"train.batch_size {cfg.train.batch_size} must split evenly over {d.world} "
                                     f"processes and micro-batches of {micro}")
            mode = choose_parallelism(cfg, d, device)
            if device.type == "cuda" and not cfg.model.init_from and cfg.stage == "pretrain":
                from .memory import check_fits

                check_fits(cfg, stage.tokenizer.vocab_size, d.world, mode, torch.cuda.get_device_properties(device).total_memory)
            model = parallelize(stage.build_model(device), cfg, d, device, dtype, mode)
            step_model = compiled(model, device) if cfg.train.compile else model  # shares the parameters
            return run_stage(stage, model, d, device, dtype, threads, micro, step_model)
        finally:
            if lock is not None:
                lock.release()
