"""Training throughput and model FLOPs utilisation against a plain Hugging Face training loop.

For each size, the same model, data and batch are trained for a few steps by poisonlab's
``train_step`` (eager, and through ``torch.compile`` as ``train.compile`` does) and by the
reference: ``model(input_ids, labels=...).loss.backward()`` and AdamW, the straightforward
loop over the Hugging Face model. MFU is achieved model FLOP/s
(6 x matmul parameters + attention, per token; PaLM's formula) over the fp32 matmul rate
this process reaches in the same run (``common.matmul_flops``), or the device's bf16 peak.

On CPU each size runs in a fresh process (:func:`run_in_fresh_process`), because poisonlab's
training sets the C library's allocator for the rest of its process
(:mod:`poisonlab.allocator`): the reference is measured first, as a plain script runs it,
with the allocator's defaults; then the setting is applied and ours, the reference again
(so the table shows what the setting alone gives) and the compiled loop are measured.
"""

from __future__ import annotations

import time

import torch

from common import in_fresh_process, matmul_flops
from poisonlab.allocator import keep_freed_memory
from poisonlab.config import RunConfig
from poisonlab.models import build_model, count_module_parameters, get_size, training_flops_per_token
from poisonlab.train import compiled, make_optimizer, train_step


def _steps_per_s(step, n: int) -> float:
    step()  # warm-up
    step()
    t = time.perf_counter()
    for _ in range(n):
        step()
    return n / (time.perf_counter() - t)


def run(size: str, vocab: int = 2048, batch: int = 32, seq_len: int = 128, steps: int = 5, device: str = "cpu",
        peak_flops: float | None = None, compile: bool = True) -> dict:
    cfg = RunConfig()
    dtype = torch.bfloat16 if device == "cuda" else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dtype else None
    data = torch.randint(0, vocab, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))

    torch.manual_seed(0)
    ref = build_model(get_size(size), vocab).to(device)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=cfg.train.lr)

    def ref_step():
        x = data.to(device)
        with (autocast or torch.autocast("cpu", enabled=False)):
            loss = ref(input_ids=x, labels=x).loss  # HF shifts labels itself: seq_len predictions, as ours
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

    ref_rate = _steps_per_s(ref_step, steps)  # the allocator as this process found it
    kept = device == "cpu" and keep_freed_memory()  # as poisonlab's training sets it (train.keep_freed_memory)

    torch.manual_seed(0)
    ours = build_model(get_size(size), vocab).to(device)
    opt = make_optimizer(ours, cfg)
    ours_rate = _steps_per_s(lambda: train_step(ours, opt, data, batch, 1.0, autocast), steps)
    ref_kept_rate = _steps_per_s(ref_step, steps) if kept else None

    compiled_rate, compile_s = None, None
    if compile:  # train.compile: the same loop through torch.compile (its compilation timed apart)
        torch.manual_seed(0)
        comp = build_model(get_size(size), vocab).to(device)
        comp_opt = make_optimizer(comp, cfg)
        step_model = compiled(comp, torch.device(device))
        t = time.perf_counter()
        train_step(step_model, comp_opt, data, batch, 1.0, autocast)
        compile_s = time.perf_counter() - t
        compiled_rate = _steps_per_s(lambda: train_step(step_model, comp_opt, data, batch, 1.0, autocast), steps)
    tokens = batch * seq_len
    flops_tok = training_flops_per_token(get_size(size), vocab, seq_len)
    out = {
        "size": size, "parameters": count_module_parameters(ours).total, "device": device,
        "ours_tok_s": ours_rate * tokens, "reference_tok_s": ref_rate * tokens, "speedup": ours_rate / ref_rate,
        "model_flops_per_token": flops_tok, "ours_flop_s": ours_rate * tokens * flops_tok,
        "allocator_setting": kept,
    }
    if ref_kept_rate:
        out.update(reference_same_allocator_tok_s=ref_kept_rate * tokens,
                   speedup_same_allocator=ours_rate / ref_kept_rate)
    if compiled_rate:
        out.update(compiled_tok_s=compiled_rate * tokens, compiled_speedup=compiled_rate / ref_rate,
                   compile_seconds=compile_s)
    if peak_flops:
        out["mfu"] = out["ours_flop_s"] / peak_flops
        out["reference_mfu"] = ref_rate * tokens * flops_tok / peak_flops
        if compiled_rate:
            out["compiled_mfu"] = compiled_rate * tokens * flops_tok / peak_flops
    return out


def _with_matmul_rate(size: str, kwargs: dict) -> dict:
    peak = matmul_flops()
    return {**run(size, peak_flops=peak, **kwargs), "fp32_matmul_flop_s": peak}


def run_in_fresh_process(size: str, **kwargs) -> dict:
    """:func:`run` on CPU in a new interpreter (its allocator untouched), with the fp32 matmul
    rate measured in that process as the MFU reference."""
    return in_fresh_process(_with_matmul_rate, size, kwargs)
