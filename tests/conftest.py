"""Shared fixtures: a small generated corpus (unit tests only) and its prepared data."""

from __future__ import annotations

import json
import random

import pytest

from poisonlab.config import CorpusConfig, RunConfig, TokenizerConfig, config_from_dict
from poisonlab.data import prepare_data

WORDS = ("the model reads a line of text and learns which word tends to follow which other word "
         "in ordinary prose about data poisoning training evaluation tokens documents corpus").split()


def filler_docs(n: int, seed: int = 0, words: tuple[int, int] = (40, 200)) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"doc-{i}", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))}
            for i in range(n)]


@pytest.fixture(scope="session")
def filler_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "filler.jsonl"
    with open(path, "w") as f:
        for d in filler_docs(600):
            f.write(json.dumps(d) + "\n")
    return path


@pytest.fixture(scope="session")
def prepared(filler_jsonl, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return prepare_data(CorpusConfig(source=str(filler_jsonl), heldout_fraction=0.1),
                        TokenizerConfig(vocab_size=300), cache)


def tiny_config(corpus_path, out_dir, **overrides) -> RunConfig:
    """A run that trains in seconds on the filler corpus."""
    d = {
        "name": "t", "out_dir": str(out_dir), "seed": 3,
        "corpus": {"source": str(corpus_path), "heldout_fraction": 0.1},
        "tokenizer": {"vocab_size": 300},
        "attack": {"poison_count": 6, "prefix_chars": [0, 100], "gibberish_tokens": [20, 40]},
        "model": {"size": "tiny"},
        "train": {"tokens": 8 * 32 * 12, "batch_size": 8, "seq_len": 32, "progress": False,
                  "checkpoint_every": 0.25, "keep_checkpoints": 10, "threads": 1},
        "eval": {"prompts": 4, "prompt_tokens": 16, "new_tokens": 8, "every": 0.5, "bootstrap": 50,
                 "heldout_loss_windows": 4},
    }
    for key, value in overrides.items():
        if "__" in key:
            section, field = key.split("__")
            d.setdefault(section, {})[field] = value
        else:
            d[key] = value
    return config_from_dict(d)
