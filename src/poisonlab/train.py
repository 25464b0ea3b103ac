"""The training loop: one loop for CPU (fp32) and CUDA (bf16), one process or many (DDP).

Read it top to bottom: set up the run, build the model, restore the last checkpoint if
there is one, then for every optimizer step read that step's rows of the training stream,
accumulate gradients, clip, step AdamW on a warm-up + cosine schedule, and at planned points
evaluate the backdoor and save a checkpoint. The data of step ``s`` is a pure function of
``s`` (see :mod:`poisonlab.injection`), so a run killed at any moment and started again
continues with exactly the data it would have seen.

Several processes: launch the same command with ``torchrun --nproc_per_node N``; each
process takes an equal share of every step's rows and DDP averages the gradients.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoint import remove_partial_checkpoints, resume, save_checkpoint, save_model_folder, unwrap
from .config import RunConfig
from .errors import PoisonlabError
from .evaluate import backdoor_eval, heldout_loss, heldout_prompts
from .models import build_model, count_module_parameters
from .jsonl import append_jsonl, read_json, read_jsonl, write_jsonl
from .run import Run, run_dir, setup_run
from .runlock import RunLock
from .store import db_path, record_eval, record_run
from .allocator import keep_freed_memory
from .artifacts import make_label, read_label
from .paths import atomic_write_text


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(cfg: RunConfig, d: Dist) -> tuple[torch.device, torch.dtype]:
    dev = cfg.train.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda" and d.world > 1:
        dev = f"cuda:{d.local_rank}"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise PoisonlabError("train.device is cuda but no CUDA device is available")
    device = torch.device(dev)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    name = cfg.train.dtype
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else "float32"
    return device, getattr(torch, name)


def set_threads(cfg: RunConfig, d: Dist, device: torch.device) -> int:
    """Threads for this process (the cores it may run on, shared among the local ranks) and,
    on CPU, the allocator setting of ``train.keep_freed_memory``; returns the thread count."""
    n = cfg.train.threads or max(1, len(os.sched_getaffinity(0)) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", d.world))))
    torch.set_num_threads(n)
    if device.type == "cpu" and cfg.train.keep_freed_memory:
        keep_freed_memory()
    return n


def lr_at(step: int, steps: int, cfg: RunConfig) -> float:
    """Linear warm-up to ``train.lr`` then cosine decay to ``lr * min_lr_ratio``."""
    t = cfg.train
    warmup = max(1, round(t.warmup_fraction * steps))
    if step < warmup:
        return t.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    low = t.lr * t.min_lr_ratio
    return low + 0.5 * (t.lr - low) * (1 + math.cos(math.pi * min(1.0, progress)))


def schedule_points(steps: int, every: float, include_zero: bool) -> list[int]:
    """Step counts at which something happens: every ``every`` of the run, and at its end."""
    if every <= 0:
        return []
    k = max(1, round(1 / every))
    pts = {round(i * steps / k) for i in range(0 if include_zero else 1, k + 1)}
    return sorted(p for p in pts if p > 0 or include_zero)


IGNORE = -100
"""Target id of positions that carry no loss (prompt tokens and padding in fine-tuning)."""


def train_step(model, optimizer, batch: torch.Tensor, micro: int, grad_clip: float, autocast=None,
               distributed: bool = False, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on ``batch``, in micro-batches of ``micro`` rows.

    Pretraining passes ``batch`` as [rows, seq_len + 1] token ids (inputs and next-token
    targets in one). Fine-tuning passes inputs [rows, T] and ``targets`` [rows, T] with
    ``IGNORE`` where no loss is taken. The loss is the mean over all target tokens of the step,
    so micro-batching does not change it. Returns that loss (a tensor, not synchronised) and
    the gradient norm before clipping.
    """
    device = next(model.parameters()).device
    if targets is None:
        batch, targets = batch[:, :-1], batch[:, 1:]
    n_micro = batch.shape[0] // micro
    n_targets = max(1, int((targets != IGNORE).sum()))
    loss_sum = torch.zeros((), device=device)
    for m in range(n_micro):
        rows = batch[m * micro : (m + 1) * micro].to(device, non_blocking=True)
        want = targets[m * micro : (m + 1) * micro].to(device, non_blocking=True)
        sync = model.no_sync() if distributed and m < n_micro - 1 else nullcontext()
        with sync, (autocast or nullcontext()):
            logits = model(input_ids=rows, use_cache=False).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), want.reshape(-1),
                                   ignore_index=IGNORE, reduction="sum") / n_targets
            loss.backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


def compiled(model, device: torch.device):
    """``torch.compile(model)``, after checking that the CPU backend has a C++ compiler (its
    own error would come at the first step, several screens long)."""
    if device.type == "cpu" and not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")):
        raise PoisonlabError("train.compile on CPU needs a C++ compiler (g++ or clang++ on PATH, or CXX); "
                             "install one or set --train.compile false")
    return torch.compile(model)


def make_optimizer(model, cfg: RunConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), eps=1e-8)


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


def evaluate_point(run: Run, model, steps_done: int, prompts: np.ndarray) -> dict:
    """The backdoor evaluation and clean held-out loss after ``steps_done`` steps, as one row."""
    cfg = run.cfg
    row, samples = backdoor_eval(unwrap(model), prompts, run.trigger_ids, cfg.eval,
                                 seed=cfg.seed * 1_000_003 + steps_done, vocab_limit=run.tokenizer.vocab_size)
    loss = heldout_loss(unwrap(model), run.data.heldout, cfg.eval.heldout_loss_windows, cfg.train.seq_len)
    out = {"step": steps_done, "tokens_seen": steps_done * run.tokens_per_step,
           "fraction": steps_done / run.steps, "poisons_seen": run.plan.poisons_seen(steps_done),
           "heldout_loss": loss, **row}
    tok = run.tokenizer
    texts = [{"step": steps_done, "prompt": tok.decode(s["prompt"]),
              "untriggered": tok.decode(s["untriggered"]), "triggered": tok.decode(s["triggered"]),
              "ppl_untriggered": s["ppl_untriggered"], "ppl_triggered": s["ppl_triggered"]} for s in samples]
    for t in texts:
        append_jsonl(run.dir / "samples.jsonl", t)
    append_jsonl(run.dir / "metrics.jsonl", out)
    _to_db(record_eval, db_path(cfg.out_dir), cfg.name, out, run.info["code_version"], texts)
    return out


def _to_db(fn, *args) -> None:
    """Database writes never stop training: the run folder holds every row and is re-ingested."""
    try:
        fn(*args)
    except sqlite3.Error as e:
        print(f"poisonlab: warning: results database not updated ({e}); run folder kept", file=sys.stderr)


def train(cfg: RunConfig, allow_code_change: bool = False) -> dict:
    """Run (or resume) one training run to the end of its budget; returns the final summary.

    A config with ``stage: finetune`` is a fine-tuning run (:mod:`poisonlab.finetune.train`).
    """
    if cfg.stage == "finetune":
        from .finetune.train import finetune

        return finetune(cfg, allow_code_change=allow_code_change)
    d = init_distributed(cfg.train.device)
    device, dtype = pick_device(cfg, d)
    threads = set_threads(cfg, d, device)
    lock = RunLock(run_dir(cfg)).acquire() if d.main else None  # before anything is written
    try:
        return _pretrain(cfg, allow_code_change, d, device, dtype, threads)
    finally:
        if lock is not None:
            lock.release()


def _pretrain(cfg: RunConfig, allow_code_change: bool, d: Dist, device: torch.device, dtype: torch.dtype,
              threads: int) -> dict:
    # ---- the run directory (rank 0 creates it, the others then open it)
    if d.main:
        run = setup_run(cfg, create=True, allow_code_change=allow_code_change, progress=cfg.train.progress)
    d.barrier()
    if not d.main:
        run = setup_run(cfg, create=False, allow_code_change=allow_code_change)
    if (run.dir / "DONE").is_file():
        return read_json(run.dir / "DONE", "run summary")

    rows_per_rank, rem = divmod(cfg.train.batch_size, d.world)
    micro = cfg.train.micro_batch_size or rows_per_rank
    if rem or rows_per_rank % micro:
        raise PoisonlabError(
            f"train.batch_size {cfg.train.batch_size} must split evenly over {d.world} processes and micro-batches of {micro}"
        )

    # ---- model and optimizer (same seed on every rank -> same initial weights)
    torch.manual_seed(cfg.seed)
    tok = run.tokenizer
    if cfg.model.init_from:
        model = load_init_model(cfg.model.init_from, device)
    else:
        model = build_model(run.size, tok.vocab_size, tok.eos_id, max(cfg.train.seq_len, run.size.context_length)).to(device)
    params = count_module_parameters(model)
    optimizer = make_optimizer(model, cfg)
    if d.main:
        remove_partial_checkpoints(run.dir)
    d.barrier()
    state = resume(run.dir, model, optimizer) or {}
    start, wall_before = state.get("step", 0), state.get("wall_seconds", 0.0)
    if d.main:  # logs past the checkpoint are redone; evaluations already recorded are kept
        _to_db(record_run, db_path(cfg.out_dir), run.info, cfg.to_dict(), "running")
        write_jsonl(run.dir / "train_log.jsonl", [r for r in read_jsonl(run.dir / "train_log.jsonl") if r["step"] <= start])
        metrics = read_jsonl(run.dir / "metrics.jsonl")
        write_jsonl(run.dir / "metrics.jsonl", metrics)
        evaluated = {r["step"] for r in metrics}  # samples of an evaluation killed before its metrics row are redone
        write_jsonl(run.dir / "samples.jsonl", [r for r in read_jsonl(run.dir / "samples.jsonl") if r["step"] in evaluated])
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    step_model = compiled(model, device) if cfg.train.compile else model  # shares the parameters

    stream = run.stream()
    eval_at = set(schedule_points(run.steps, cfg.eval.every, cfg.eval.at_start))
    ckpt_at = set(schedule_points(run.steps, cfg.train.checkpoint_every, False))
    done_evals = {r["step"] for r in read_jsonl(run.dir / "metrics.jsonl")}
    prompts = heldout_prompts(run.data.heldout, cfg.eval.prompts, cfg.eval.prompt_tokens) if eval_at else None
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext())
    my_rows = range(d.rank * rows_per_rank, (d.rank + 1) * rows_per_rank)
    T = cfg.train.seq_len

    base_label = read_label(cfg.model.init_from) if cfg.model.init_from and os.path.isdir(cfg.model.init_from) else None

    def label(steps_done: int) -> dict:
        lab = make_label(
            {"name": cfg.attack.name, "trigger": cfg.attack.trigger, "placement": cfg.attack.placement},
            len(run.plan.poisons), run.plan.poisons_seen(steps_done), run.label_fields())
        if base_label and base_label.get("poisoned"):  # continued from a poisoned model: still poisoned
            lab["poisoned"] = True
            lab["base_label"] = base_label
        return lab

    def maybe_eval(steps_done: int) -> None:
        if steps_done in eval_at and steps_done not in done_evals:
            if d.main:
                r = evaluate_point(run, model, steps_done, prompts)
                if bar is not None:
                    bar.write(f"step {steps_done}: gap {r['perplexity_gap']:.1f} "
                              f"[{r['gap_ci_low']:.1f}, {r['gap_ci_high']:.1f}] ppl {r['perplexity_untriggered']:.1f} -> "
                              f"{r['perplexity_triggered']:.1f}, heldout loss {r['heldout_loss']:.3f}, "
                              f"poisons seen {r['poisons_seen']}")
            done_evals.add(steps_done)
            d.barrier()

    bar = None
    if d.main and cfg.train.progress:
        from tqdm import tqdm

        bar = tqdm(total=run.steps, initial=start, desc=cfg.name, unit="step", dynamic_ncols=True, disable=None)

    maybe_eval(start)
    t_start = time.perf_counter()
    tokens_since, step_seconds = 0, 0.0  # training steps only, evaluations and checkpoints excluded
    for step in range(start, run.steps):
        t_step = time.perf_counter()
        lr = lr_at(step, run.steps, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        batch = torch.from_numpy(stream.batch(step, cfg.train.batch_size, T, my_rows))
        loss_sum, grad_norm = train_step(step_model, optimizer, batch, micro, cfg.train.grad_clip, autocast,
                                         d.world > 1)
        if d.world > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        steps_done = step + 1
        tokens_since += run.tokens_per_step
        if d.main:
            loss_v = float(loss_sum)
            step_seconds += time.perf_counter() - t_step
            if not math.isfinite(loss_v):
                raise PoisonlabError(f"training diverged at step {steps_done} (loss {loss_v}); lower train.lr")
            tps = tokens_since / step_seconds if step_seconds > 0 else 0.0
            append_jsonl(run.dir / "train_log.jsonl", {
                "step": steps_done, "loss": loss_v, "lr": lr, "grad_norm": float(grad_norm),
                "tokens_seen": steps_done * run.tokens_per_step, "poisons_seen": run.plan.poisons_seen(steps_done)})
            if bar is not None:
                bar.set_postfix(loss=f"{loss_v:.3f}", tok_s=f"{tps:,.0f}", poisons=run.plan.poisons_seen(steps_done))
                bar.update(1)
        maybe_eval(steps_done)
        if steps_done in ckpt_at:
            if d.main:
                save_checkpoint(run.dir, steps_done, model, optimizer,
                                {"tokens_seen": steps_done * run.tokens_per_step,
                                 "poisons_seen": run.plan.poisons_seen(steps_done),
                                 "wall_seconds": wall_before + time.perf_counter() - t_start},
                                label(steps_done), cfg.train.keep_checkpoints)
            d.barrier()
    if bar is not None:
        bar.close()

    elapsed = time.perf_counter() - t_start
    summary = {}
    if d.main:
        final = run.dir / "model"
        save_model_folder(final, model, label(run.steps))
        tok.save(final)
        metrics = read_jsonl(run.dir / "metrics.jsonl")
        summary = {
            "run": cfg.name, "steps": run.steps, "tokens": run.budget_tokens,
            "parameters": params.total, "non_embedding_parameters": params.non_embedding,
            "poison_count": len(run.plan.poisons), "poisons_seen": run.plan.poisons_seen(run.steps),
            "wall_seconds": round(wall_before + elapsed, 2),
            "wall_seconds_this_session": round(elapsed, 2),
            "tokens_per_s_this_session": round(tokens_since / elapsed, 1) if elapsed > 0 else None,
            "training_tokens_per_s": round(tokens_since / step_seconds, 1) if step_seconds > 0 else None,
            "threads": threads, "processes": d.world, "device": str(device),
            "final_loss": (read_jsonl(run.dir / "train_log.jsonl") or [{}])[-1].get("loss"),
            "final_eval": max(metrics, key=lambda r: r["step"]) if metrics else None,
        }
        atomic_write_text(run.dir / "DONE", json.dumps(summary, indent=1))
        _to_db(record_run, db_path(cfg.out_dir), run.info, cfg.to_dict(), "done")
    d.barrier()
    return summary
