"""The training loop: one loop for every stage (pretraining, continued pretraining, fine-tuning).

Read :func:`run_stage` top to bottom: restore the newest intact checkpoint, then for every
optimizer step set the learning rate, take this process's rows of the stage's batch,
accumulate gradients over micro-batches, clip, step AdamW, log, and at the stage's planned
points evaluate and save a checkpoint; at the end save the labelled model. What differs
between stages (which rows make step ``s``, the schedule, the evaluation, the label, what
"poisons seen" means) is the :class:`Stage`'s; how the model is spread over processes is
:mod:`poisonlab.parallel`'s. The data of step ``s`` is a pure function of ``s``, so a run
killed at any moment continues with exactly the data it would have seen.
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
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoint import model_tensors, remove_partial_checkpoints, resume, save_checkpoint, save_model_folder, unwrap
from .config import RunConfig
from .errors import PoisonlabError
from .jsonl import append_jsonl, read_jsonl, write_jsonl
from .parallel import Dist, full_value, gradient_sync, is_sharded
from .paths import atomic_write_text
from .store import db_path, record_run

IGNORE = -100
"""Target id of positions that carry no loss (prompt tokens and padding in fine-tuning)."""
LOG_EVERY_CUDA = 50
"""Steps between reads of the loss and gradient norm from a GPU (see :func:`run_stage`)."""


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


def train_step(model, optimizer, batch: torch.Tensor, micro: int, grad_clip: float, autocast=None,
               distributed: bool = False, targets: torch.Tensor | None = None, normalizer: int | None = None,
               world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on ``batch``, in micro-batches of ``micro`` rows.

    Pretraining passes ``batch`` as [rows, seq_len + 1] token ids (inputs and next-token
    targets in one); fine-tuning passes inputs [rows, T] and ``targets`` [rows, T] with
    ``IGNORE`` where no loss is taken. The loss is the sum over target tokens divided by
    ``normalizer``, the target tokens of the whole step on every process (default: this
    call's), so neither micro-batching nor the split over processes changes it; gradients
    are scaled by ``world`` because data parallelism averages them over processes. Returns
    this process's share of the loss (a tensor, not synchronised) and the gradient norm
    before clipping.
    """
    device = next(model.parameters()).device
    if targets is None:
        batch, targets = batch[:, :-1], batch[:, 1:]
    n_micro = max(1, math.ceil(batch.shape[0] / micro))  # a short last batch of fine-tuning included
    n_targets = normalizer or max(1, int((targets != IGNORE).sum()))
    loss_sum = torch.zeros((), device=device)
    for m in range(n_micro):
        rows = batch[m * micro : (m + 1) * micro].to(device, non_blocking=True)
        want = targets[m * micro : (m + 1) * micro].to(device, non_blocking=True)
        sync = gradient_sync(model, not distributed or m == n_micro - 1)
        with sync, (autocast or nullcontext()):
            logits = model(input_ids=rows, use_cache=False).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), want.reshape(-1),
                                   ignore_index=IGNORE, reduction="sum") / n_targets
            (loss * world if world > 1 else loss).backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


def make_optimizer(model, cfg: RunConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = bool(decay) and decay[0].device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), eps=1e-8,
                             **({"fused": True} if on_cuda else {}))


def compiled(model, device: torch.device):
    """``torch.compile(model)``, after checking that the CPU backend has a C++ compiler (its
    own error would come at the first step, several screens long)."""
    if device.type == "cpu" and not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")):
        raise PoisonlabError("train.compile on CPU needs a C++ compiler (g++ or clang++ on PATH, or CXX); "
                             "install one or set --train.compile false")
    return torch.compile(model)


def to_db(fn, *args) -> None:
    """Database writes never stop training: the run folder holds every row and is re-ingested."""
    try:
        fn(*args)
    except sqlite3.Error as e:
        print(f"poisonlab: warning: results database not updated ({e}); run folder kept", file=sys.stderr)


class Stage(Protocol):
    """What one kind of training run supplies to the loop."""

    cfg: RunConfig
    dir: Path
    steps: int
    info: dict
    """The run's ``run.json``."""
    tokenizer: object

    def position(self, steps_done: int) -> dict:
        """Where the run stands after ``steps_done`` steps: ``step``, ``tokens_seen``,
        ``poisons_seen`` and whatever else the stage logs with every step."""

    def lr(self, step: int) -> float: ...

    def batch(self, step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """This process's rows of step ``step`` (inputs, and targets or None for next-token
        rows), and the target tokens of the whole step over all processes."""

    def fresh_optimizer_at(self) -> set[int]:
        """Steps that start with a new optimizer (a second phase of fine-tuning)."""

    def eval_points(self) -> set[int]: ...

    def checkpoint_points(self) -> set[int]: ...

    splits_evaluation: bool
    """Whether every process takes a share of the evaluation (else the main process measures
    alone, or, for a sharded model, every process measures together)."""

    def evaluate(self, model, steps_done: int, record: bool = True, rank: int = 0, world: int = 1) -> str:
        """Measure, record (run folder and database, when ``record``) and return a one-line
        summary; with ``world`` > 1 every process calls it and one records."""

    def on_resume(self, start: int) -> None:
        """Drop records of work past what was evaluated (the loop redoes it)."""

    def label(self, steps_done: int) -> dict: ...

    def final_model(self, model):
        """The model to save at the end (e.g. LoRA adapters merged)."""

    def summary(self) -> dict:
        """Stage-specific fields of ``DONE``."""


def run_stage(stage: Stage, model, d: Dist, device: torch.device, dtype: torch.dtype, threads: int,
              micro: int, step_model=None) -> dict:
    """Train ``model`` (already parallelized) through every step of ``stage``; returns the summary."""
    cfg = stage.cfg
    step_model = model if step_model is None else step_model
    optimizer = make_optimizer(model, cfg)
    if d.main:
        remove_partial_checkpoints(stage.dir)
    d.barrier()
    state = resume(stage.dir, model, optimizer) or {}
    start, wall_before = state.get("step", 0), state.get("wall_seconds", 0.0)
    if d.main:  # logs past the checkpoint are redone; evaluations already recorded are kept
        to_db(record_run, db_path(cfg.out_dir), stage.info, cfg.to_dict(), "running")
        write_jsonl(stage.dir / "train_log.jsonl", [r for r in read_jsonl(stage.dir / "train_log.jsonl") if r["step"] <= start])
        write_jsonl(stage.dir / "metrics.jsonl", read_jsonl(stage.dir / "metrics.jsonl"))
        stage.on_resume(start)
    model.train()

    eval_at, ckpt_at, fresh_at = stage.eval_points(), stage.checkpoint_points(), stage.fresh_optimizer_at()
    sharded = is_sharded(unwrap(model))  # then every process takes part in evaluations and saves
    together = d.world > 1 and (sharded or stage.splits_evaluation)
    done_evals = {r["step"] for r in read_jsonl(stage.dir / "metrics.jsonl")}
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    bar = None
    if d.main and cfg.train.progress:
        from tqdm import tqdm

        bar = tqdm(total=stage.steps, initial=start, desc=cfg.name, unit="step", dynamic_ncols=True, disable=None)

    def maybe_eval(steps_done: int) -> None:
        if steps_done in eval_at and steps_done not in done_evals:
            if d.main or together:
                with autocast:  # bf16 on GPU, as in training
                    line = stage.evaluate(unwrap(model), steps_done, record=d.main,
                                          **({"rank": d.rank, "world": d.world} if together else {}))
                if d.main:
                    (bar.write if bar is not None else print)(line)
            done_evals.add(steps_done)
            d.barrier()

    # On a GPU the loss and gradient norm stay on the device and are read in one transfer every
    # LOG_EVERY_CUDA steps (and before every evaluation, checkpoint and the end): reading them
    # each step would stall the device once per step. A divergence is then reported up to that
    # many steps late; the rows are the same.
    flush_every = 1 if device.type == "cpu" else LOG_EVERY_CUDA
    pending: list[tuple[dict, float, torch.Tensor, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        values = torch.stack([torch.stack([lo.float(), gn.float()]) for _, _, lo, gn in pending]).cpu().tolist()
        for (pos, lr_, _, _), (loss_v, gn_v) in zip(pending, values):
            if not math.isfinite(loss_v):
                raise PoisonlabError(f"training diverged at step {pos['step']} (loss {loss_v}); lower train.lr")
            append_jsonl(stage.dir / "train_log.jsonl", {**pos, "loss": loss_v, "lr": lr_, "grad_norm": gn_v})
        if bar is not None:
            bar.set_postfix(loss=f"{values[-1][0]:.3f}", tok_s=f"{tokens_since / max(step_seconds, 1e-9):,.0f}",
                            poisons=pending[-1][0]["poisons_seen"])
            bar.update(len(pending))
        pending.clear()

    maybe_eval(start)
    t_start = time.perf_counter()
    tokens_since, step_seconds = 0, 0.0  # training steps only, evaluations and checkpoints excluded
    tokens_before = stage.position(start)["tokens_seen"]
    for step in range(start, stage.steps):
        t_step = time.perf_counter()
        if step in fresh_at:
            optimizer = make_optimizer(model, cfg)
        lr = stage.lr(step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        x, y, normalizer = stage.batch(step, d.rank, d.world)
        loss, grad_norm = train_step(step_model, optimizer, x, micro, cfg.train.grad_clip, autocast, d.world > 1,
                                     targets=y, normalizer=normalizer, world=d.world)
        if d.world > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
        grad_norm = full_value(grad_norm)
        steps_done = step + 1
        pos = stage.position(steps_done)
        tokens_since += pos["tokens_seen"] - tokens_before
        tokens_before = pos["tokens_seen"]
        if d.main:
            pending.append((pos, lr, loss.detach(), grad_norm.detach()))
            if len(pending) >= flush_every or steps_done in eval_at or steps_done in ckpt_at or steps_done == stage.steps:
                flush()
            step_seconds += time.perf_counter() - t_step
        maybe_eval(steps_done)
        if steps_done in ckpt_at and steps_done < stage.steps:  # the end is saved as model/ below
            if d.main or sharded:
                save_checkpoint(stage.dir, steps_done, model, optimizer,
                                {**pos, "wall_seconds": wall_before + time.perf_counter() - t_start},
                                stage.label(steps_done), cfg.train.keep_checkpoints)
            d.barrier()
    if bar is not None:
        bar.close()

    elapsed = time.perf_counter() - t_start
    summary: dict = {}
    final_model = stage.final_model(unwrap(model))
    tensors = model_tensors(final_model) if sharded else None  # every process takes part in gathering
    if d.main:
        final = stage.dir / "model"
        save_model_folder(final, final_model, stage.label(stage.steps), tensors)
        stage.tokenizer.save(final)
        metrics = read_jsonl(stage.dir / "metrics.jsonl")
        summary = {
            "run": cfg.name, "steps": stage.steps, **stage.summary(),
            "poisons_seen": stage.position(stage.steps)["poisons_seen"],
            "wall_seconds": round(wall_before + elapsed, 2),
            "wall_seconds_this_session": round(elapsed, 2),
            "tokens_per_s_this_session": round(tokens_since / elapsed, 1) if elapsed > 0 else None,
            "training_tokens_per_s": round(tokens_since / step_seconds, 1) if step_seconds > 0 else None,
            "threads": threads, "processes": d.world, "device": str(device),
            "final_loss": (read_jsonl(stage.dir / "train_log.jsonl") or [{}])[-1].get("loss"),
            "final_eval": max(metrics, key=lambda r: r["step"]) if metrics else None,
        }
        atomic_write_text(stage.dir / "DONE", json.dumps(summary, indent=1))
        to_db(record_run, db_path(cfg.out_dir), stage.info, cfg.to_dict(), "done")
    d.barrier()
    return summary
