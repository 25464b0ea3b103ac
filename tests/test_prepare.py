"""Parallel corpus preparation writes byte for byte what one process writes."""

from __future__ import annotations

import json

import pytest

from poisonlab.config import CorpusConfig, TokenizerConfig
from poisonlab.data import prepare_data
from poisonlab.prepare import partitions

from conftest import filler_docs

pytest.importorskip("datatrove")


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in {"info.json"} and "tokenizer" not in p.parts}


@pytest.mark.parametrize("layout", ["one-file", "folder"])
def test_parallel_preparation_equals_one_process(layout, tmp_path):
    docs = filler_docs(900, seed=5)
    docs[10]["text"] = "short"  # under min_chars: left out by both paths
    src = tmp_path / "src"
    src.mkdir()
    if layout == "one-file":
        rows = [json.dumps({"text": d["text"]}) for d in docs]  # no ids: <file>:<line> must come out the same
        rows.insert(300, "")  # a blank line shifts every later line number
        (src / "c.jsonl").write_text("\n".join(rows) + "\n")
        source = src / "c.jsonl"
    else:
        for k in range(5):
            (src / f"p{k}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[k::5]))
        source = src
    tok = TokenizerConfig(vocab_size=300)
    cfg = CorpusConfig(source=str(source), heldout_fraction=0.1, max_tokens=40_000)
    assert len(partitions(cfg, 3)) == 3
    one = prepare_data(cfg, tok, tmp_path / "one")
    par = prepare_data(CorpusConfig(**{**cfg.__dict__, "prepare_workers": 3}), tok, tmp_path / "par")
    assert one.directory.name == par.directory.name  # the same cache key
    assert one.hashes == par.hashes and one.info == par.info
    assert _files(one.directory) == _files(par.directory)
    assert one.info["token_cap_reached"] and one.train.total_tokens <= 40_000
    assert not list((tmp_path / "par").glob(".parts-*"))  # the task outputs are gone
