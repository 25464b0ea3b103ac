"""A spec's poison-count search: replayed from results, run by the sweep, exported runs count."""

from __future__ import annotations

import json

import pytest
import yaml

from poisonlab.errors import PoisonlabError
from poisonlab.run import run_dir
from poisonlab.search import states
from poisonlab.spec import load_spec, spec_from_dict


def _spec(tmp_path, corpus, grid=None, **search):
    data = {
        "name": "th", "out_dir": str(tmp_path / "th"),
        "base": {"corpus": {"source": str(corpus), "heldout_fraction": 0.1}, "tokenizer": {"vocab_size": 300},
                 "attack": {"prefix_chars": [0, 100], "gibberish_tokens": [20, 40]}, "model": {"size": "tiny"},
                 "train": {"tokens": 8 * 32 * 30, "batch_size": 8, "seq_len": 32},
                 "eval": {"prompts": 4, "prompt_tokens": 16, "new_tokens": 8, "every": 0.5, "bootstrap": 50,
                          "heldout_loss_windows": 4}},
        "grid": grid or {"attack.poison_count": [0], "seed": [0, 1, 2]},
        "search": {"over": {"train.lr": [0.001, 0.003]}, "low": 2, "high": 64, "seeds": [0, 1, 2],
                   "first_seeds": 1, "resolution": 1.0, **search},
    }
    p = tmp_path / "th.yaml"
    p.write_text(yaml.safe_dump(data))
    return load_spec(p)


def _finish(cfg, gap_low: float) -> None:
    """A finished run folder as training leaves it (no weights needed to decide a search)."""
    d = run_dir(cfg)
    d.mkdir(parents=True, exist_ok=True)
    (d / "run.json").write_text(json.dumps({"name": cfg.name}))
    rows = [{"step": 0, "gap_ci_low": 0.0, "threshold": 50.0}, {"step": 30, "gap_ci_low": gap_low, "threshold": 50.0}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "DONE").write_text("")


def test_replaying_the_search_on_results_asks_for_each_run_once_and_finds_the_threshold(filler_jsonl, tmp_path):
    spec = _spec(tmp_path, filler_jsonl)
    threshold = {0.001: 20, 0.003: 5}  # true thresholds of the two settings
    made = []
    for _ in range(50):
        pending = [st.pending for st in states(spec) if st.pending is not None]
        if not pending:
            break
        for cfg in pending:
            assert cfg.name not in made
            made.append(cfg.name)
            _finish(cfg, 100.0 if cfg.attack.poison_count >= threshold[cfg.train.lr] else 10.0)
    st = {s.combo["train.lr"]: s for s in states(spec)}
    for lr, true in threshold.items():
        r = st[lr].result
        assert r.highest_failure < true <= r.lowest_success <= 2 * r.highest_failure
        seeds_at = {}
        for c, s, _ in r.observations:
            seeds_at.setdefault(c, set()).add(s)
        assert seeds_at[r.lowest_success] == seeds_at[r.highest_failure] == {0, 1, 2}
        assert all(len(v) == 1 for c, v in seeds_at.items() if c not in (r.lowest_success, r.highest_failure))
    names = [c.name for c in spec.expand()]
    assert names[:3] == ["th-p0-s0", "th-p0-s1", "th-p0-s2"]  # the grid, then the searched runs
    assert set(names[3:]) == set(made) and len(names) == len(set(names))
    assert "th-p5-s1-lr=0.003" in names  # runs are named like grid runs


def test_a_run_exported_to_results_counts_for_the_search(filler_jsonl, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = _spec(tmp_path, filler_jsonl)
    first = states(spec)[0].pending
    assert first.attack.poison_count == 64 and first.seed == 0  # the top of the range first
    archived = tmp_path / "results" / "th" / first.name
    archived.mkdir(parents=True)
    _finish(first, 100.0)
    import shutil

    shutil.copytree(run_dir(first), archived, dirs_exist_ok=True)
    shutil.rmtree(run_dir(first))
    nxt = states(spec)[0].pending
    assert nxt.attack.poison_count == 2  # 64 succeeded (read from results/): the bottom next


def test_search_settings_are_validated(filler_jsonl):
    base = {"corpus": {"source": str(filler_jsonl)}}
    for search, msg in [({"over": {"attack.poison_count": [1]}}, "not a run-config key the search can vary"),
                        ({"low": 50, "high": 10}, "0 < low < high"),
                        ({"seeds": []}, "non-empty list of seeds"),
                        ({"bogus": 1}, "unknown search key 'bogus'")]:
        with pytest.raises(PoisonlabError, match=msg):
            spec_from_dict({"name": "x", "base": base, "search": search})
    spec = spec_from_dict({"name": "x", "base": base, "search": [{"over": {"model.size": ["tiny"]}, "high": 100},
                                                                  {"over": {"model.size": ["1m"]}, "high": 400}]})
    assert [t.search.high for t in spec.search_targets()] == [100, 400]
    assert spec.expand(searched=False) == []  # a search alone adds no base run


def test_the_report_rows_give_the_count_needed_and_flag_a_costly_backdoor(filler_jsonl, tmp_path):
    from poisonlab.report_search import search_rows, search_table

    spec = _spec(tmp_path, filler_jsonl, grid={"train.lr": [0.001, 0.003], "attack.poison_count": [0], "seed": [0, 1, 2]})
    threshold = {0.001: 20, 0.003: 5}
    for cfg in spec.expand(searched=False):  # clean twins: loss 4.0, untriggered ppl 50
        _finish(cfg, 0.0)
    for _ in range(50):
        pending = [st.pending for st in states(spec) if st.pending is not None]
        if not pending:
            break
        for cfg in pending:
            ok = cfg.attack.poison_count >= threshold[cfg.train.lr]
            _finish(cfg, 100.0 if ok else 10.0)
            d = run_dir(cfg)
            rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
            for r in rows:  # the 0.003 setting's backdoor costs clean loss
                r.update(perplexity_gap=r["gap_ci_low"] + 5, heldout_loss=4.5 if cfg.train.lr == 0.003 else 4.01,
                         perplexity_untriggered=52.0)
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (d / "poison_stats.jsonl").write_text(json.dumps({"tokens": 100}) + "\n")
    for cfg in spec.expand(searched=False):
        d = run_dir(cfg)
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        for r in rows:
            r.update(perplexity_gap=1.0, heldout_loss=4.0, perplexity_untriggered=50.0)
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = {r["setting"]: r for r in search_rows(spec)}
    slow, fast = rows["lr=0.001"], rows["lr=0.003"]
    assert slow["complete"] and slow["highest_failure"] < 20 <= slow["lowest_success"]
    assert slow["seeds_at_success"] == "3/3" and slow["clean_twins"] == 3
    assert slow["poison_share"] == pytest.approx(slow["lowest_success"] * 100 / (8 * 32 * 30))
    assert slow["flags"] == [] and fast["flags"] == ["held-out loss worse than the clean twins'"]
    assert fast["clean_heldout_loss"] == pytest.approx(4.0) and fast["poisoned_heldout_loss"] == pytest.approx(4.5)
    table = search_table(list(rows.values()))
    assert f"| {slow['lowest_success']:,} |" in table and "held-out loss worse" in table


def test_a_search_continued_above_the_first_ones_range_reports_one_row(filler_jsonl, tmp_path):
    from poisonlab.report_search import search_rows

    base = {"corpus": {"source": str(filler_jsonl), "heldout_fraction": 0.1}, "tokenizer": {"vocab_size": 300},
            "attack": {"prefix_chars": [0, 100], "gibberish_tokens": [20, 40]}, "model": {"size": "tiny"},
            "train": {"tokens": 8 * 32 * 30, "batch_size": 8, "seq_len": 32}}
    spec = spec_from_dict({"name": "th", "out_dir": str(tmp_path / "th"), "base": base, "search": [
        {"over": {"train.lr": [0.003]}, "low": 2, "high": 64, "first_seeds": 1},
        {"over": {"train.lr": [0.003]}, "low": 64, "high": 256, "first_seeds": 1, "resolution": 0.5}]})
    true = 150
    for _ in range(50):
        pending = [st.pending for st in states(spec) if st.pending is not None]
        if not pending:
            break
        for cfg in pending:
            _finish(cfg, 100.0 if cfg.attack.poison_count >= true else 10.0)
    lower, upper = states(spec)
    assert lower.result.lowest_success is None and lower.result.highest_failure == 64
    rows = search_rows(spec)
    assert len(rows) == 1 and rows[0]["setting"] == "lr=0.003" and rows[0]["complete"]
    assert rows[0]["lowest_success"] == upper.result.lowest_success >= true
    assert 64 <= rows[0]["highest_failure"] < true
    assert rows[0]["runs"] == len({c.name for st in (lower, upper) for c in st.runs})
    assert rows[0]["half_success"] is not None and 64 < rows[0]["half_success"] < 256
