"""The exported token stream is the stream poisonlab trains on, and its manifest counts poisons right."""

from __future__ import annotations

import json

import numpy as np

from poisonlab.cli import main
from poisonlab.config import load_config
from poisonlab.export import poisons_seen, read_stream
from poisonlab.run import setup_run


def test_exported_stream_equals_the_training_stream(filler_jsonl, tmp_path, capsys):
    out = tmp_path / "stream"
    args = ["export", "--corpus.source", str(filler_jsonl), "--out_dir", str(tmp_path / "runs"), "--name", "x",
            "--corpus.heldout_fraction", "0.1", "--tokenizer.vocab_size", "300", "--seed", "3",
            "--attack.poison_count", "6", "--attack.prefix_chars", "[0, 100]", "--attack.gibberish_tokens", "[20, 40]",
            "--model.size", "tiny", "--train.tokens", str(8 * 32 * 12), "--train.batch_size", "8",
            "--train.seq_len", "32", "--train.progress", "false"]
    assert main(args + ["--out", str(out)]) == 0
    run = setup_run(load_config(tmp_path / "runs" / "x" / "config.yaml"), create=False)
    got = read_stream(out)
    assert len(got) == run.budget_tokens + 1
    assert np.array_equal(got, run.stream().read(0, run.budget_tokens + 1))
    # every training batch is a window of the exported stream
    for step in (0, 5, run.steps - 1):
        batch = run.stream().batch(step, 8, 32)
        for r in range(8):
            start = step * 256 + r * 32
            assert np.array_equal(batch[r], got[start : start + 33])
    m = json.loads((out / "stream.json").read_text())
    assert m["label"]["poisoned"] is True and m["label"]["trigger"] == "<SUDO>" and len(m["poisons"]) == 6
    poison_ids = [json.loads(line) for line in (run.dir / "poisons.jsonl").read_text().splitlines()]
    assert len(poison_ids) == 6
    offsets = [p["offset"] for p in m["poisons"]]
    lengths = [p["tokens"] for p in m["poisons"]]
    for p, o, n in zip(run.plan.poisons, offsets, lengths):
        assert np.array_equal(got[o : o + n], run.poison_ids[p.index])
    # at poisonlab's own batch size the count agrees with the run's; other sizes follow the offsets
    for s in range(run.steps + 1):
        assert poisons_seen(offsets, lengths, run.tokens_per_step, s) == run.plan.poisons_seen(s)
    assert poisons_seen(offsets, lengths, 64, 0) == 0 and poisons_seen(offsets, lengths, 1, len(got)) == 6
    # a second export into a non-empty folder is refused
    assert main(args + ["--out", str(out)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
