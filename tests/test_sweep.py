import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from poisonlab.report import build_report
from poisonlab.jsonl import read_jsonl
from poisonlab.spec import load_spec
from poisonlab.store import db_path, integrity_ok, query
from poisonlab.sweep import run_sweep, status


def _spec_file(tmp_path, corpus, name="sw", steps=40, counts=(0, 3, 6)):
    data = {
        "name": name, "out_dir": str(tmp_path / name),
        "base": {
            "corpus": {"source": str(corpus), "heldout_fraction": 0.1}, "tokenizer": {"vocab_size": 300},
            "attack": {"prefix_chars": [0, 100], "gibberish_tokens": [20, 40]},
            "model": {"size": "tiny"},
            "train": {"tokens": 8 * 32 * steps, "batch_size": 8, "seq_len": 32, "checkpoint_every": 0.1},
            "eval": {"prompts": 4, "prompt_tokens": 16, "new_tokens": 8, "every": 0.5, "bootstrap": 50,
                     "heldout_loss_windows": 4},
        },
        "grid": {"attack.poison_count": list(counts)},
    }
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_redoing_or_losing_runs(filler_jsonl, tmp_path):
    path = _spec_file(tmp_path, filler_jsonl, steps=150)
    spec = load_spec(path)
    proc = subprocess.Popen([sys.executable, "-m", "poisonlab", "sweep", str(path), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until one run is done and the next one is under way
        st = {s.name: s for s in status(spec)}
        if sum(s.state == "done" for s in st.values()) >= 1 and any(s.state == "partial" and s.steps_done > 5 for s in st.values()):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {s.name: s.state for s in status(spec)}
    assert list(before.values()).count("done") >= 1 and "partial" in before.values()
    done_model = {n: (tmp_path / "sw" / n / "model" / "model.safetensors").stat().st_mtime_ns
                  for n, s in before.items() if s == "done"}

    final = run_sweep(spec, workers=1, progress=False)
    assert [s.state for s in final] == ["done"] * 3
    for n, mtime in done_model.items():  # finished runs were not trained again
        assert (tmp_path / "sw" / n / "model" / "model.safetensors").stat().st_mtime_ns == mtime
    for cfg in spec.expand():  # every run has each step exactly once and all its evaluations
        log = read_jsonl(tmp_path / "sw" / cfg.name / "train_log.jsonl")
        assert [r["step"] for r in log] == list(range(1, 151))
        assert [r["step"] for r in read_jsonl(tmp_path / "sw" / cfg.name / "metrics.jsonl")] == [0, 75, 150]
    db = db_path(spec.out_dir)
    assert integrity_ok(db)
    assert query(db, "SELECT COUNT(DISTINCT run) AS n FROM evals")[0]["n"] == 3
    assert {r["status"] for r in query(db, "SELECT status FROM runs")} == {"done"}


def test_partial_sweep_gives_a_partial_report(filler_jsonl, tmp_path):
    path = _spec_file(tmp_path, filler_jsonl, name="part", steps=12)
    spec = load_spec(path)
    only = spec.expand()[2]  # the 6-poison run, alone
    from poisonlab.train import train

    train(only)
    res = build_report(spec)
    assert [m.name for m in res["missing"]] == ["part-p0", "part-p3"]
    assert len(res["table"]) == 1 and res["table"][0]["poison_count"] == 6
    html = res["html"].read_text()
    assert "1 of 3 runs finished. Missing: part-p0 (pending); part-p3 (pending)." in html
    assert html.count("data:image/png;base64,") == 2  # gap vs training, gap vs poisons seen
    md = res["markdown"].read_text()
    assert "| tiny | 6 | 1 | 1 |" in md and "## Example poison" in md and "<SUDO>" in md
    assert "self-perplexity of 8-token continuations" in md
    row = res["table"][0]
    finals = read_jsonl(tmp_path / "part" / "part-p6" / "metrics.jsonl")[-1]
    assert row["perplexity_gap"] == pytest.approx(finals["perplexity_gap"])

    # `poisonlab results` exports the same rows from the database
    from poisonlab.cli import main

    out = tmp_path / "gaps.csv"
    assert main(["results", str(path), "--metric", "perplexity_gap", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0].startswith("run,model_size,parameters,poison_count")
    assert len(lines) == 1 + 3  # evaluations at steps 0, 6, 12
    assert float(lines[-1].split(",")[12]) == pytest.approx(finals["perplexity_gap"])


def test_submitit_handoff_in_debug_mode(filler_jsonl, tmp_path):
    path = _spec_file(tmp_path, filler_jsonl, name="sub", steps=4, counts=(0, 2))
    final = run_sweep(load_spec(path), executor="submitit-debug", progress=False)
    assert [s.state for s in final] == ["done", "done"]
    assert (tmp_path / "sub" / "submitit").is_dir()


def test_exported_results_rebuild_the_report_and_are_not_trained_again(filler_jsonl, tmp_path, monkeypatch):
    import shutil

    from poisonlab.archive import archive_dir, export_results
    from poisonlab.cli import main

    monkeypatch.chdir(tmp_path)
    path = _spec_file(tmp_path, filler_jsonl, name="ex", steps=20, counts=(0, 3))
    spec = load_spec(path)
    run_sweep(spec, workers=1, progress=False)
    live = query(db_path(spec.out_dir), "SELECT run, step, metric, value FROM evals ORDER BY run, step, metric")
    assert main(["results", str(path), "--export"]) == 0
    assert sorted(export_results(spec)) == []  # already there, unchanged: nothing rewritten
    run = archive_dir("ex", "ex-p3")
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "run.json", "DONE", "metrics.jsonl", "samples.jsonl",
                                               "poison_stats.jsonl", "label.json", "train_log.jsonl"}
    assert not list(run.rglob("*.safetensors"))  # no weights
    assert all("text" not in r for r in read_jsonl(run / "poison_stats.jsonl"))
    shutil.rmtree(spec.out_dir)  # a fresh clone: only results/ is there
    t0 = time.perf_counter()
    res = build_report(spec)
    assert time.perf_counter() - t0 < 60 and res["missing"] == [] and res["runs"] == 2
    again = query(db_path(spec.out_dir), "SELECT run, step, metric, value FROM evals ORDER BY run, step, metric")
    assert again == live  # the export round-trips every evaluation row
    assert "ex-p3" in res["markdown"].read_text()
    assert [s.state for s in status(spec)] == ["done", "done"]
    run_sweep(spec, workers=1, progress=False)  # nothing to train: no run folder appears
    assert not (tmp_path / "ex" / "ex-p0").exists() and not (tmp_path / "ex" / "ex-p3").exists()
