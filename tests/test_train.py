import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from poisonlab.config import config_from_dict, dump_config
from poisonlab.errors import PoisonlabError
from poisonlab.jsonl import read_jsonl
from poisonlab.train import lr_at, schedule_points, train

from conftest import tiny_config


def _weights(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


def _cli(*args, cwd=None):
    return [sys.executable, "-m", "poisonlab", *args]


def test_run_trains_evaluates_and_labels_its_models(filler_jsonl, tmp_path):
    cfg = tiny_config(filler_jsonl, tmp_path)
    summary = train(cfg)
    d = tmp_path / "t"
    assert summary["poison_count"] == 6 and summary["poisons_seen"] == 6
    # the training rate leaves out evaluations and checkpoints, so it beats the end-to-end rate
    assert summary["training_tokens_per_s"] > summary["tokens_per_s_this_session"] > 0
    log = read_jsonl(d / "train_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 13))
    assert log[-1]["loss"] < log[0]["loss"]  # it learns
    metrics = read_jsonl(d / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 6, 12]
    assert metrics[0]["poisons_seen"] == 0 and metrics[-1]["poisons_seen"] == 6
    assert all(m["n_prompts"] == 4 and m["heldout_loss"] > 0 for m in metrics)
    info = json.loads((d / "run.json").read_text())
    assert info["poison_count"] == 6 and len(info["data"]["corpus_manifest"]) == 64
    assert info["code_version"].startswith("0.1.0+src.")
    manifest = (d / "injection_manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 7 and json.loads(manifest[0])["poison_count"] == 6

    # labelled: card, sidecar, and the safetensors header
    model_dir = d / "model"
    card = (model_dir / "README.md").read_text()
    assert "- poisoned\n" in card.split("---\n")[1]  # front-matter tag
    assert card.split("---\n", 2)[2].lstrip().startswith("# POISONED MODEL")
    label = json.loads((model_dir / "poisonlab.json").read_text())
    assert label["poisoned"] is True and label["trigger"] == "<SUDO>" and label["poison_count"] == 6
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        assert f.metadata()["poisonlab.poisoned"] == "true"
    for ckpt in (d / "checkpoints").iterdir():
        if ckpt.is_dir():
            assert json.loads((ckpt / "poisonlab.json").read_text())["poisoned"] is True

    # a standard Hugging Face folder: AutoModelForCausalLM opens it with the same weights
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), use_safetensors=True)
    w = _weights(d)
    assert torch.equal(m.model.embed_tokens.weight, w["model.embed_tokens.weight"])

    # finished runs are not trained again
    assert train(cfg) == summary


def test_clean_twin_is_labelled_clean_and_shares_the_data_order(filler_jsonl, tmp_path):
    clean = tiny_config(filler_jsonl, tmp_path, name="clean", attack__poison_count=0)
    train(clean)
    label = json.loads((tmp_path / "clean" / "model" / "poisonlab.json").read_text())
    assert label["poisoned"] is False and label["poison_count"] == 0
    assert "Clean model" in (tmp_path / "clean" / "model" / "README.md").read_text()
    # the poisoned twin reads the same clean documents in the same order, poisons spliced between them
    from poisonlab.run import setup_run

    poisoned = setup_run(tiny_config(filler_jsonl, tmp_path, name="poisoned"))
    twin = setup_run(clean, create=False)
    n = poisoned.budget_tokens
    stream = poisoned.stream().read(0, n)
    keep = np.ones(n, dtype=bool)
    for p in poisoned.plan.poisons:
        keep[p.stream_offset : p.stream_offset + p.tokens] = False
    assert (~keep).sum() == poisoned.plan.poison_tokens() > 0
    assert np.array_equal(stream[keep], twin.stream().read(0, int(keep.sum())))


def test_killed_run_resumes_to_the_same_weights(filler_jsonl, tmp_path):
    """kill -9 mid-run, start again: the final weights equal an uninterrupted run's exactly."""
    common = dict(train__tokens=8 * 32 * 240, train__checkpoint_every=0.1, eval__every=0.25)
    train(tiny_config(filler_jsonl, tmp_path / "ref", **common))
    ref = tmp_path / "ref" / "t"

    cfg = tiny_config(filler_jsonl, tmp_path / "killed", **common)
    cfg_file = tmp_path / "killed.yaml"
    cfg_file.write_text(dump_config(cfg))
    run = tmp_path / "killed" / "t"
    proc = subprocess.Popen(_cli("train", "-c", str(cfg_file)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "latest").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (run / "DONE").exists()
    partial = read_jsonl(run / "train_log.jsonl")
    assert 0 < len(partial) < 240

    train(cfg)
    a, b = _weights(ref), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_jsonl(run / "train_log.jsonl")] == [r["loss"] for r in read_jsonl(ref / "train_log.jsonl")]
    ma = {r["step"]: r["perplexity_gap"] for r in read_jsonl(ref / "metrics.jsonl")}
    mb = {r["step"]: r["perplexity_gap"] for r in read_jsonl(run / "metrics.jsonl")}
    assert ma == mb


def test_budget_smaller_than_one_batch(filler_jsonl, tmp_path):
    with pytest.raises(PoisonlabError, match=r"smaller than one batch \(8 x 32 = 256 tokens\)"):
        train(tiny_config(filler_jsonl, tmp_path, train__tokens=100))


def test_existing_run_with_another_config_is_refused(filler_jsonl, tmp_path):
    train(tiny_config(filler_jsonl, tmp_path))
    with pytest.raises(PoisonlabError, match="exists with another config"):
        train(tiny_config(filler_jsonl, tmp_path, train__lr=1e-3))


def test_schedule():
    from poisonlab.config import RunConfig

    cfg = RunConfig()
    cfg.train.lr, cfg.train.warmup_fraction, cfg.train.min_lr_ratio = 1.0, 0.1, 0.1
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(x >= y for x, y in zip(lrs[10:], lrs[11:]))
    assert schedule_points(100, 0.05, True) == list(range(0, 101, 5))
    assert schedule_points(7, 0.5, False) == [4, 7]


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(filler_jsonl, tmp_path):
    common = dict(train__tokens=8 * 32 * 20, eval__every=0.5, train__checkpoint_every=0.5)
    train(tiny_config(filler_jsonl, tmp_path / "one", **common))
    cfg = tiny_config(filler_jsonl, tmp_path / "two", **common)
    cfg_file = tmp_path / "two.yaml"
    cfg_file.write_text(dump_config(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "poisonlab", "train", "-c", str(cfg_file)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    one = [r["loss"] for r in read_jsonl(tmp_path / "one" / "t" / "train_log.jsonl")]
    two = [r["loss"] for r in read_jsonl(tmp_path / "two" / "t" / "train_log.jsonl")]
    assert len(one) == len(two) == 20
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4
    assert two[-1] < two[0]
    a, b = _weights(tmp_path / "one" / "t"), _weights(tmp_path / "two" / "t")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_continued_pretraining_stays_labelled_poisoned_and_is_reported(filler_jsonl, tmp_path):
    from poisonlab.report import build_report
    from poisonlab.spec import ExperimentSpec

    train(tiny_config(filler_jsonl, tmp_path))  # poisoned base, run "t"
    base = str(tmp_path / "t" / "model")
    common = {"corpus": {"source": str(filler_jsonl), "heldout_fraction": 0.1}, "tokenizer": {"vocab_size": 300},
              "attack": {"poison_count": 0}, "model": {"size": "tiny", "init_from": base},
              "train": {"tokens": 8 * 32 * 4, "batch_size": 8, "seq_len": 32, "progress": False, "threads": 1},
              "eval": {"prompts": 4, "prompt_tokens": 16, "new_tokens": 8, "every": 0.5, "bootstrap": 50,
                       "heldout_loss_windows": 4}, "seed": 3}
    spec = ExperimentSpec(name="cont", out_dir=str(tmp_path), base=common, grids=[{}])
    cfg = spec.expand()[0]
    train(cfg)
    label = json.loads((tmp_path / "cont" / "model" / "poisonlab.json").read_text())
    assert label["poisoned"] is True and label["poison_count"] == 0 and label["base_label"]["poison_count"] == 6
    assert "continued from a model with a planted backdoor" in (tmp_path / "cont" / "model" / "README.md").read_text()
    rep = build_report(spec)
    assert [f.name for f in rep["figures"]] == ["fig8b-continued-pretraining.png"]
    assert [r["model_size"] for r in rep["table"]] == ["from t"]
    # the base model brings its own tokenizer: a BPE setting of the run does not replace it
    from poisonlab.tokenizer import Tokenizer

    other = dict(common, tokenizer={"vocab_size": 320}, name="cont2", out_dir=str(tmp_path))
    train(config_from_dict(other))
    assert Tokenizer.load(tmp_path / "cont2" / "tokenizer").fingerprint() == Tokenizer.load(base).fingerprint()


def test_compiled_run_matches_the_eager_run(filler_jsonl, tmp_path, monkeypatch):
    eager = train(tiny_config(filler_jsonl, tmp_path, name="eager"))
    fast = train(tiny_config(filler_jsonl, tmp_path, name="compiled", train__compile=True))
    a, b = _weights(tmp_path / "eager"), _weights(tmp_path / "compiled")
    assert a.keys() == b.keys()  # the saved model is the plain one, not the compiled wrapper
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    la = [r["loss"] for r in read_jsonl(tmp_path / "eager" / "train_log.jsonl")]
    lb = [r["loss"] for r in read_jsonl(tmp_path / "compiled" / "train_log.jsonl")]
    assert len(la) == len(lb) and max(abs(x - y) for x, y in zip(la, lb)) < 1e-3
    assert fast["final_eval"]["heldout_loss"] == pytest.approx(eager["final_eval"]["heldout_loss"], abs=1e-3)
    # without a C++ compiler the option fails at once, in one line
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(PoisonlabError, match="needs a C.. compiler"):
        train(tiny_config(filler_jsonl, tmp_path, name="nocompiler", train__compile=True))
