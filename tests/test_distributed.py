"""Several processes on CPU (gloo, launched by torchrun): FSDP2 and DDP against one process,
sharded checkpoints resumed at another world size, and a failing rank ending the job."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from poisonlab.config import dump_config
from poisonlab.jsonl import read_jsonl
from poisonlab.train import train

from conftest import tiny_config

pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _config(corpus, out: Path, **kw):
    base = dict(train__tokens=8 * 32 * 24, train__checkpoint_every=0.25, eval__every=0.5, train__threads=1,
                train__keep_checkpoints=10)
    return tiny_config(corpus, out, **{**base, **kw})


def _torchrun(cfg, *flags, wait: bool = True, script: list[str] | None = None):
    path = Path(cfg.out_dir) / f"{cfg.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(cfg))
    cmd = TORCHRUN + (script or ["-m", "poisonlab", "train"]) + ["-c", str(path), *flags]
    if not wait:
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def _close(a: dict, b: dict, atol: float = 5e-5) -> float:
    """Largest absolute weight difference, asserted under ``atol``: two processes sum their
    gradients in another order than one, and AdamW's normalised steps carry that rounding into
    the weights (1.07e-5 after these 24 steps on one CPU, under 1e-5 on another), while a wrong
    reduction (a rank's gradients left out) moves them by about the learning rate each step."""
    assert sorted(a) == sorted(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst
    return worst


@pytest.fixture(scope="module")
def single(filler_jsonl, tmp_path_factory):
    """The uninterrupted one-process run everything below is compared with."""
    out = tmp_path_factory.mktemp("single")
    train(_config(filler_jsonl, out, name="r"))
    return out / "r"


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_two_processes_match_one(mode, single, filler_jsonl, tmp_path):
    cfg = _config(filler_jsonl, tmp_path, name="r", train__parallelism=mode)
    res = _torchrun(cfg)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "r"
    one, two = read_jsonl(single / "train_log.jsonl"), read_jsonl(run / "train_log.jsonl")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 25))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two)) < 1e-5
    _close(_weights(single), _weights(run))
    done = json.loads((run / "DONE").read_text())
    assert done["processes"] == 2
    # the evaluation is split over the processes, each sampling its prompts with its own generator:
    # the held-out loss is the same, the gap the same in expectation (its intervals overlap)
    for a, b in zip(read_jsonl(single / "metrics.jsonl"), read_jsonl(run / "metrics.jsonl")):
        assert a["step"] == b["step"] and a["n_prompts"] == b["n_prompts"] == 4
        assert b["heldout_loss"] == pytest.approx(a["heldout_loss"], rel=1e-5)
        assert a["gap_ci_low"] <= b["gap_ci_high"] and b["gap_ci_low"] <= a["gap_ci_high"]
    if mode == "fsdp":
        ckpt = run / "checkpoints" / "step-00000006"
        assert sorted(p.name for p in ckpt.glob("*-rank*.safetensors")) == [
            "model-rank00000.safetensors", "model-rank00001.safetensors",
            "optimizer-rank00000.safetensors", "optimizer-rank00001.safetensors"]


def test_killed_fsdp_run_resumes_on_one_and_on_two_processes(single, filler_jsonl, tmp_path):
    cfg = _config(filler_jsonl, tmp_path / "a", name="r", train__parallelism="fsdp")
    proc = _torchrun(cfg, wait=False)
    run = tmp_path / "a" / "r"
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step-00000012").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "DONE").exists(), "the run finished before it could be killed"
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    res = _torchrun(cfg)  # two processes, the sharded checkpoint as it was written
    assert res.returncode == 0, res.stdout[-3000:]
    _close(_weights(single), _weights(run))
    one = _config(filler_jsonl, tmp_path / "b", name="r")  # one plain process reads the shards
    train(one)
    _close(_weights(single), _weights(tmp_path / "b" / "r"))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_finetuning_under_every_parallel_mode(mode, prepared, tmp_path):
    from poisonlab.config import config_from_dict

    from test_finetune import _base_model

    base = _base_model(prepared.tokenizer, tmp_path / "base")

    def cfg(out):
        return config_from_dict({
            "name": "ft", "out_dir": str(out), "stage": "finetune", "seed": 1,
            "finetune": {"base": str(base), "clean_count": 20, "poison_count": 6, "epochs": 1,
                         "eval_requests": 2, "max_new_tokens": 2},
            "train": {"batch_size": 8, "seq_len": 512, "progress": False, "threads": 1, "parallelism": mode},
            "eval": {"every": 0},
        })

    train(cfg(tmp_path / "one"))
    res = _torchrun(cfg(tmp_path / "two"))
    assert res.returncode == 0, res.stdout[-3000:]
    one, two = read_jsonl(tmp_path / "one" / "ft" / "train_log.jsonl"), read_jsonl(tmp_path / "two" / "ft" / "train_log.jsonl")
    assert len(one) == len(two) == 4  # 26 examples in batches of 8, the last one short
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two)) < 1e-5
    _close(_weights(tmp_path / "one" / "ft"), _weights(tmp_path / "two" / "ft"))


FAILING = r"""
import sys
from poisonlab import train as t
from poisonlab.cli import main
from poisonlab.errors import PoisonlabError
import torch.distributed as dist

real = t.PretrainStage.batch
def batch(self, step, rank, world):
    if step == 3 and rank == 1:
        raise PoisonlabError("rank 1 cannot read its rows")
    return real(self, step, rank, world)
t.PretrainStage.batch = batch
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_a_rank_that_raises_stops_every_rank(filler_jsonl, tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    cfg = _config(filler_jsonl, tmp_path, name="r", train__tokens=8 * 32 * 400)
    t0 = time.time()
    res = _torchrun(cfg, script=[str(script)])
    took = time.time() - t0
    assert res.returncode != 0
    assert "rank 1 cannot read its rows" in res.stdout + res.stderr
    assert took < 60, took  # not the collective timeout
    assert not (tmp_path / "r" / "DONE").exists()
