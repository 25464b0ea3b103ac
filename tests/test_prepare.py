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


def test_preparation_on_slurm_submits_an_array_then_the_assembly_and_gives_the_same_bytes(tmp_path, monkeypatch):
    import dill
    import datatrove.executor.slurm as dslurm

    from poisonlab.config import ClusterConfig
    from poisonlab.prepare import prepare_on_slurm

    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in filler_docs(700, seed=9)))
    submitted = []

    def fake_sbatch(script, retriever, *args):
        submitted.append((script, args))
        return str(100 + len(submitted))

    monkeypatch.setattr(dslurm, "launch_slurm_job", fake_sbatch)
    cfg = CorpusConfig(source=str(src), heldout_fraction=0.1, prepare_workers=3)
    tok = TokenizerConfig(vocab_size=300)
    job, final = prepare_on_slurm(cfg, tok, tmp_path / "cache", ClusterConfig(partition="cpu", account="lab", time_min=90))
    ids = {str(101 + i): sub for i, sub in enumerate(submitted)}  # datatrove adds a statistics job after each
    tokenize = [(i, a) for i, (sc, a) in ids.items() if "job-name=tokenize-" in sc and "launch_pickled_pipeline" in sc]
    assemble = [(i, sc, a) for i, (sc, a) in ids.items() if "job-name=assemble-" in sc and "launch_pickled_pipeline" in sc]
    assert len(tokenize) == 1 and len(assemble) == 1 and job == assemble[0][0]
    array_script = ids[tokenize[0][0]][0]
    assert "#SBATCH --array=0-2" in array_script and "#SBATCH --partition=cpu" in array_script
    assert "#SBATCH --time=90" in array_script and "#SBATCH --account=lab" in array_script
    assert f"--dependency=afterok:{tokenize[0][0]}" in assemble[0][2]  # assembled only once every part is done
    # what the cluster would run: every array task, then the assembly
    monkeypatch.setenv("SLURM_NODELIST", "localhost")
    monkeypatch.setattr(dslurm, "expand_slurm_nodelist", lambda nodes: [nodes])  # scontrol is Slurm's
    stage = final.parent / f".slurm-{final.name}"
    for name, ranks in (("tokenize", range(3)), ("assemble", range(1))):
        with open(stage / "logs" / name / "executor.pik", "rb") as f:
            executor = dill.load(f)  # written by prepare_on_slurm a moment ago
        for r in ranks:
            executor._run_for_rank(r)
    assert (final / "info.json").is_file() and not list(stage.glob("part-*"))
    one = prepare_data(CorpusConfig(source=str(src), heldout_fraction=0.1), tok, tmp_path / "one")
    assert one.directory.name == final.name
    assert _files(one.directory) == _files(final)
