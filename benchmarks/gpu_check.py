"""The GPU check: CUDA tests, bf16 training MFU at 125M under DDP and FSDP2, evaluation speed.

    python benchmarks/gpu_check.py                 # every visible GPU; about 5-8 minutes
    python benchmarks/gpu_check.py --gpus 1 --steps 20

1. ``pytest tests/test_cuda.py tests/test_distributed.py`` (the CUDA tests, and the gloo ones).
2. 125m, seq 2048, bf16: training tokens/s and MFU (model FLOPs per token x tokens/s over the
   GPUs' bf16 peak) with ``torchrun --nproc_per_node N`` under DDP and under FSDP2 (one GPU:
   FSDP2 over a one-process group, to measure its overhead).
3. The perplexity-gap evaluation of a 125m model at the evaluation's setting (100 prompts of
   128 tokens, 256 new tokens): generated tokens/s.

Prints one JSON object; docs/performance.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}

TRAIN = r"""
import json, os, sys, time
import torch, torch.distributed as dist
from poisonlab.config import config_from_dict
from poisonlab.loop import make_optimizer, train_step
from poisonlab.models import build_model, get_size, training_flops_per_token
from poisonlab.parallel import Dist, parallelize

mode, steps, micro = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
dist.init_process_group("nccl")
rank, world = dist.get_rank(), dist.get_world_size()
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
torch.backends.cuda.matmul.allow_tf32 = True
cfg = config_from_dict({"model": {"size": "125m"}, "train": {"batch_size": micro * world, "seq_len": 2048}})
torch.manual_seed(0)
model = build_model(get_size("125m"), 32000, 0, 2048).to(dev)
d = Dist(rank, world, int(os.environ["LOCAL_RANK"]))
if mode == "fsdp" and world == 1:  # measure FSDP2's own overhead on one GPU
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    pol = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=pol)
    fully_shard(model, mp_policy=pol)
else:
    model = parallelize(model, cfg, d, dev, torch.bfloat16, mode)
opt = make_optimizer(model, cfg)
x = torch.randint(0, 32000, (micro, 2049), device=dev)
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if mode == "ddp" else None
for _ in range(3):
    train_step(model, opt, x, micro, 1.0, autocast, world > 1, world=world)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(steps):
    train_step(model, opt, x, micro, 1.0, autocast, world > 1, world=world)
torch.cuda.synchronize(); el = time.perf_counter() - t
tok_s = steps * micro * 2048 * world / el
flops = training_flops_per_token(get_size("125m"), 32000, 2048)
if rank == 0:
    print("RESULT " + json.dumps({"mode": mode, "gpus": world, "tokens_per_s": round(tok_s), "flops_per_token": flops,
                                  "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}))
dist.destroy_process_group()
"""

EVAL = r"""
import json, time, numpy as np, torch
from poisonlab.config import EvalConfig
from poisonlab.evaluate import backdoor_eval
from poisonlab.models import build_model, get_size
torch.manual_seed(0)
m = build_model(get_size("125m"), 32000, 0, 2048).cuda().eval()
prompts = np.random.default_rng(0).integers(0, 32000, (100, 128))
cfg = EvalConfig(prompts=100, new_tokens=256, bootstrap=100)
with torch.autocast("cuda", dtype=torch.bfloat16):
    backdoor_eval(m, prompts[:8], [5, 6], EvalConfig(prompts=8, new_tokens=8, bootstrap=20), 0, 32000)
    row, _ = backdoor_eval(m, prompts, [5, 6], cfg, 0, 32000)
print("RESULT " + json.dumps({"eval_generated_tokens_per_s": row["generated_tokens_per_s"], "eval_seconds": row["eval_seconds"]}))
"""


def _result(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][7:]) if lines else {"error": out[-2000:]}


def main() -> int:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=0, help="GPUs to use (default: all visible)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 1
    gpus = args.gpus or torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
    out: dict = {"device": name, "gpus": gpus, "bf16_peak_flops": peak, "torch": torch.__version__}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if not args.skip_tests:
        t = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py",
                            "tests/test_distributed.py"], cwd=ROOT, capture_output=True, text=True, env=env)
        out["tests"] = (t.stdout.strip().splitlines() or ["?"])[-1]
        out["tests_ok"] = t.returncode == 0
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "train_bench.py"
        script.write_text(TRAIN)
        for mode in ("ddp", "fsdp"):
            r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                str(gpus), str(script), mode, str(args.steps), str(args.micro)],
                               capture_output=True, text=True, env=env)
            res = _result(r.stdout + r.stderr)
            if peak and "tokens_per_s" in res:
                res["mfu"] = round(res["tokens_per_s"] * res["flops_per_token"] / (peak * gpus), 3)
            out[f"train_125m_{mode}"] = res
        e = subprocess.run([sys.executable, "-c", EVAL], capture_output=True, text=True, env=env)
        out["eval_125m"] = _result(e.stdout + e.stderr)
    print(json.dumps(out, indent=1))
    return 0 if out.get("tests_ok", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
