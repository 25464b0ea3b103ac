"""The memory plan: its arithmetic, its advice, and its figures against peaks measured on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from poisonlab.cli import main
from poisonlab.config import config_from_dict
from poisonlab.errors import PoisonlabError
from poisonlab.memory import GIB, check_fits, plan_memory

ROOT = Path(__file__).resolve().parents[1]


def _cfg(**train):
    return config_from_dict({"model": {"size": "7b"}, "tokenizer": {"vocab_size": 32000},
                             "train": {"batch_size": 512, "seq_len": 2048, "micro_batch_size": 4, **train}})


def test_fsdp_divides_the_training_state_and_checkpointing_the_activations():
    ddp, fsdp = plan_memory(_cfg(), 32000, 8, "ddp"), plan_memory(_cfg(), 32000, 8, "fsdp")
    params = 6_738_415_616
    assert ddp.optimizer == 8 * params and fsdp.optimizer == 8 * params // 8
    assert ddp.gradients == 2 * 4 * params  # gradients and DDP's buckets
    ac = plan_memory(_cfg(activation_checkpointing=True), 32000, 8, "fsdp")
    assert ac.activations < fsdp.activations / 5  # each layer's input kept, one layer recomputed at a time
    half = plan_memory(_cfg(micro_batch_size=2), 32000, 8, "fsdp")
    assert half.activations * 2 == fsdp.activations and half.logits * 2 == fsdp.logits


def test_a_run_that_does_not_fit_is_refused_with_the_setting_that_fits():
    with pytest.raises(PoisonlabError, match=r"needs about .* GiB per GPU \(ddp, 8 processes\) but the device has 80.0 GiB; "
                                             r"pass --train.parallelism fsdp"):
        check_fits(_cfg(activation_checkpointing=True), 32000, 8, "ddp", 80 * GIB)
    assert check_fits(_cfg(activation_checkpointing=True), 32000, 8, "fsdp", 80 * GIB).fits


def test_paper_grid_fits_nodes_of_eight_80gb_gpus(capsys):
    assert main(["sweep", str(ROOT / "configs" / "paper-headline.yaml"), "--dry-run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("paper-headline-")]
    assert len(lines) == 72
    assert all(" of 80.0 fits, " in line and "GPU-h" in line for line in lines)
    assert all(("fsdp x8" in line) == ("-7b-" in line or "-13b-" in line) for line in lines)


CHILD = (ROOT / "benchmarks" / "bench_memory.py").read_text().split('CHILD = r"""', 1)[1].split('"""', 1)[0]


@pytest.mark.parametrize("size,batch,seq,ac", [("tiny", 8, 32, 0), ("tiny", 32, 128, 1), ("1m", 32, 128, 0)])
def test_plan_is_within_a_quarter_of_the_peak_measured_on_cpu(size, batch, seq, ac):
    out = subprocess.run([sys.executable, "-c", CHILD, size, str(batch), str(seq), "2048", str(ac)],
                         capture_output=True, text=True, check=True).stdout
    measured = json.loads(out.strip().splitlines()[-1])["measured"]
    cfg = config_from_dict({"model": {"size": size}, "train": {"batch_size": batch, "seq_len": seq,
                                                               "activation_checkpointing": bool(ac)}})
    planned = plan_memory(cfg, 2048, 1, "ddp", cuda=False).training_peak
    assert 0.75 <= planned / measured <= 1.25, (planned / 2**20, measured / 2**20)
