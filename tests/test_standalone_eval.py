import json
import subprocess
import sys

import pytest
import torch

from poisonlab.config import load_config
from poisonlab.models import build_model, get_size
from poisonlab.jsonl import read_jsonl
from poisonlab.standalone import evaluate_model
from poisonlab.train import train

from conftest import tiny_config


def test_eval_of_a_run_checkpoint_reproduces_the_training_time_measurement(filler_jsonl, tmp_path):
    cfg = tiny_config(filler_jsonl, tmp_path)
    train(cfg)
    final = read_jsonl(tmp_path / "t" / "metrics.jsonl")[-1]
    out = tmp_path / "eval.json"
    res = subprocess.run([sys.executable, "-m", "poisonlab", "eval", "--model", str(tmp_path / "t" / "model"),
                          "--seed", str(cfg.seed * 1_000_003 + final["step"]), "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(out.read_text())
    # same prompts, same seed, same weights: the same numbers as during training (up to the
    # float reassociation of another thread count)
    assert got["perplexity_gap"] == pytest.approx(final["perplexity_gap"], rel=1e-6)
    assert got["heldout_loss"] == pytest.approx(final["heldout_loss"], rel=1e-6)
    assert got["label"]["poisoned"] is True and got["trigger"] == "<SUDO>"
    assert len(got["provenance"]["model_sha256"]) == 64


def test_eval_of_a_plain_hugging_face_model_folder(filler_jsonl, prepared, tmp_path):
    torch.manual_seed(0)
    model = build_model(get_size("tiny"), prepared.tokenizer.vocab_size, prepared.tokenizer.eos_id)
    folder = tmp_path / "hf-model"
    model.save_pretrained(str(folder), safe_serialization=True)
    prepared.tokenizer.save(folder)
    cfg = load_config(None, {"corpus.source": str(filler_jsonl), "corpus.heldout_fraction": "0.1",
                             "out_dir": str(tmp_path), "eval.prompts": "6", "eval.prompt_tokens": "16",
                             "eval.new_tokens": "12", "eval.bootstrap": "20", "eval.heldout_loss_windows": "4",
                             "train.progress": "false"})
    res = evaluate_model(str(folder), cfg)
    assert res["label"] is None  # not a poisonlab model: no label claimed
    assert res["n_prompts"] == 6
    # an untrained model is close to uniform: self-perplexity near the vocabulary size
    assert 0.5 * 320 < res["perplexity_untriggered"] < 1.5 * 320
    assert res["heldout_loss"] > 5
