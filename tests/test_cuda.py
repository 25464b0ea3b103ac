"""CUDA paths (bf16 training and evaluation, the memory plan against the device's peak).

These need a GPU; on a machine without one pytest reports them as skipped, never as passed.
``python benchmarks/gpu_check.py`` runs them with the GPU benchmarks.
"""

from __future__ import annotations

import json

import pytest
import torch

from poisonlab.config import config_from_dict
from poisonlab.jsonl import read_jsonl
from poisonlab.train import train

from conftest import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_bf16_run_on_cuda_trains_evaluates_and_resumes(filler_jsonl, tmp_path):
    from safetensors.torch import load_file

    kw = dict(train__device="cuda", train__tokens=8 * 32 * 24, train__checkpoint_every=0.25, eval__every=0.5,
              train__keep_checkpoints=10)
    done = train(tiny_config(filler_jsonl, tmp_path / "a", **kw))
    assert done["device"].startswith("cuda")
    log = read_jsonl(tmp_path / "a" / "t" / "train_log.jsonl")
    assert len(log) == 24 and all(r["loss"] == r["loss"] for r in log) and log[-1]["loss"] < log[0]["loss"]
    metrics = read_jsonl(tmp_path / "a" / "t" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 12, 24]
    # a resumed run ends with the same weights (bf16 kernels are deterministic for a fixed shape here
    # only within rounding)
    run = tmp_path / "a" / "t"
    ref = load_file(str(run / "model" / "model.safetensors"))
    for p in ("DONE", "model/model.safetensors"):
        (run / p).unlink()
    (run / "checkpoints" / "latest").write_text("step-00000012\n")
    for p in sorted((run / "checkpoints").glob("step-*"))[2:]:
        import shutil

        shutil.rmtree(p)
    train(tiny_config(filler_jsonl, tmp_path / "a", **kw))
    again = load_file(str(run / "model" / "model.safetensors"))
    assert max((ref[k].float() - again[k].float()).abs().max().item() for k in ref) < 1e-2


def test_memory_plan_is_within_a_quarter_of_the_cuda_peak():
    from poisonlab.loop import make_optimizer, train_step
    from poisonlab.memory import plan_memory
    from poisonlab.models import build_model, get_size

    cfg = config_from_dict({"model": {"size": "125m"}, "tokenizer": {"vocab_size": 32000},
                            "train": {"batch_size": 8, "seq_len": 1024, "device": "cuda"}})
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = build_model(get_size("125m"), 32000, 0, 1024).cuda().train()
    opt = make_optimizer(model, cfg)
    x = torch.randint(0, 32000, (8, 1025), device="cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    for _ in range(3):
        train_step(model, opt, x, 8, 1.0, autocast)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    plan = plan_memory(cfg, 32000, 1, "ddp", cuda=True)
    planned = plan.training  # live tensors only: the allocator's slack and the context are not in the measure
    print(json.dumps({"planned_gib": planned / 2**30, "measured_gib": measured / 2**30}))
    assert 0.75 <= planned / measured <= 1.25, (planned / 2**30, measured / 2**30)
