"""The memory plan against the peak measured on CPU: training steps of the small sizes.

    python benchmarks/bench_memory.py            # tiny, 1m, 4m, 12m at two batch shapes

Each case runs in a fresh process: the resident set before the model is built is the
baseline (Python, torch and the libraries), the peak during three training steps minus it is
what the training state took; the plan (:mod:`poisonlab.memory`, CPU: fp32, no CUDA context)
is printed beside it with their ratio.
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, sys
import torch
from poisonlab.allocator import keep_freed_memory
from poisonlab.config import config_from_dict
from poisonlab.loop import make_optimizer, train_step
from poisonlab.models import build_model, get_size

size, batch, seq, vocab, ac = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
torch.set_num_threads(1)
keep_freed_memory()
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key)) * 1024
x = torch.randint(0, vocab, (batch, seq + 1))
base = status("VmRSS")
try:  # restart the peak here: imports may have peaked higher than the baseline for a moment
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
cfg = config_from_dict({"model": {"size": size}, "train": {"batch_size": batch, "seq_len": seq,
                        "activation_checkpointing": ac}})
model = build_model(get_size(size), vocab, 0, seq)
if ac:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.train()
opt = make_optimizer(model, cfg)
for _ in range(3):
    train_step(model, opt, x, batch, 1.0)
peak = status("VmHWM")
print(json.dumps({"measured": peak - base}))
"""

CASES = [("tiny", 8, 32), ("tiny", 32, 128), ("1m", 32, 128), ("1m", 16, 512), ("4m", 32, 128), ("12m", 32, 128)]


def main() -> int:
    from poisonlab.config import config_from_dict
    from poisonlab.memory import plan_memory

    vocab = 2048
    print(f"{'size':>5} {'batch x seq':>12} {'ac':>3} {'plan MB':>9} {'measured MB':>12} {'plan/measured':>14}")
    for size, batch, seq in CASES:
        for ac in (False, True):
            out = subprocess.run([sys.executable, "-c", CHILD, size, str(batch), str(seq), str(vocab), str(int(ac))],
                                 capture_output=True, text=True, check=True).stdout
            measured = json.loads(out.strip().splitlines()[-1])["measured"]
            cfg = config_from_dict({"model": {"size": size}, "tokenizer": {"vocab_size": vocab},
                                    "train": {"batch_size": batch, "seq_len": seq, "activation_checkpointing": ac},
                                    "eval": {"batch_size": 1, "prompts": 1, "prompt_tokens": 1, "new_tokens": 1}})
            p = plan_memory(cfg, vocab, 1, "ddp", cuda=False)
            planned = p.training_peak
            print(f"{size:>5} {f'{batch} x {seq}':>12} {'y' if ac else 'n':>3} {planned / 2**20:>9.1f} "
                  f"{measured / 2**20:>12.1f} {planned / measured:>14.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
