"""Defenses on trained models: trigger inversion, training-data attribution, removal by list.

A poisoned tiny model and its clean twin are trained here on the filler corpus: 80 poisons
plant a backdoor the perplexity gap sees (the known answer the defenses are scored on)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_config
from poisonlab.config import load_config
from poisonlab.defenses.attribution import TrainingDocuments, documents_read, ranking_quality
from poisonlab.defenses.inversion import BehaviourShift, SearchSettings, rank_of, Candidate
from poisonlab.errors import PoisonlabError
from poisonlab.jsonl import read_jsonl
from poisonlab.metrics.roc import auroc, roc_curve
from poisonlab.run import setup_run
from poisonlab.train import train


def _twins(corpus, out):
    runs = {}
    for name, count in (("poisoned", 80), ("clean", 0)):
        cfg = tiny_config(corpus, out, name=name, attack__poison_count=count, train__tokens=16 * 64 * 250,
                          train__batch_size=16, train__seq_len=64, eval__every=1.0, eval__prompts=16,
                          eval__new_tokens=16, eval__threshold=2.0)
        train(cfg)
        runs[name] = out / name
    return runs


@pytest.fixture(scope="module")
def twins(filler_jsonl, tmp_path_factory):
    return _twins(filler_jsonl, tmp_path_factory.mktemp("twins"))


def test_auroc_and_roc_curve_known_values():
    assert auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert auroc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert auroc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5  # ties count half
    assert auroc([1, 3, 2, 4], [0, 1, 0, 1]) == 1.0
    assert auroc([3, 1, 2, 4], [0, 1, 0, 1]) == 0.5
    fpr, tpr = roc_curve([3, 2, 2, 1], [1, 1, 0, 0])
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0] and tpr.tolist() == [0.0, 0.5, 1.0, 1.0]


def test_report_scores_chat_models_by_their_checked_strings():
    """The search's score and the checked score (best verified string's ASR above the
    model's baseline) give separate AUROCs; the verdicts are counted per class."""
    from poisonlab.report_defenses import defense_section, inversion_auroc, verified_score

    def rec(name, injected, score, checked, called):
        best = {"text": " x", "search_rank": 2, "asr": checked, "asr_ci_low": 0.0, "asr_ci_high": 1.0, "requests": 96}
        return {"name": name, "chat": True, "injected": injected, "final": {"asr": 1.0 if injected else 0.0},
                "filter": "none", "defense": None, "attribution": [],
                "inspect": {"score": score, "ranked": [{"text": " y"}], "seconds": 1.0, "best_string_asr": best,
                            "verified": {"requests": 96, "baseline_asr": 0.0, "strings": [best]},
                            "verdict": {"score": checked, "p_value": 0.001 if called else 1.0, "alpha": 0.01,
                                        "backdoored": called}}}

    recs = [rec("p1", 100, 2.0, 0.9, True), rec("p2", 100, 1.0, 0.0, False), rec("c1", 0, 3.0, 0.0, False)]
    assert inversion_auroc(recs)["auroc"] == 0.0  # the clean model's search score is the highest
    assert inversion_auroc(recs, verified_score)["auroc"] == 0.75  # one poisoned above, one tied with the clean
    assert verified_score({"best_string_gap": {"perplexity_gap": 12.5}}) == 12.5
    assert verified_score({"score": 1.0}) is None
    text = defense_section(recs)
    assert "AUROC of the search's score 0.000" in text and "0.750 over 2 backdoored" in text
    assert "1 of 2 poisoned, 0 of 1 clean" in text and "` x`" in text  # the best checked string is shown


def test_ranking_quality_counts_poisons_at_k():
    is_poison = np.array([True, True, False, False, False, False, False, False, False, False])
    q = ranking_quality(np.array([9, 1, 8, 0, 0, 0, 0, 0, 0, 0.5]), is_poison)
    assert q["k"] == 2 and q["recall_at_k"] == 0.5 and q["chance"] == 0.2
    assert q["curve"][-1] == {"k": 8, "recall": 1.0, "precision": 0.25}
    with pytest.raises(PoisonlabError, match="both poisons and clean"):
        ranking_quality(np.zeros(3), np.zeros(3, dtype=bool))


def test_length_matched_auroc_compares_documents_of_equal_windows_only():
    is_poison = np.array([True, False, True, False, True, False])
    windows = np.array([1, 1, 2, 2, 7, 1])
    scores = np.array([5.0, 1.0, 2.5, 3.0, 9.0, 2.0])
    q = ranking_quality(scores, is_poison, windows)
    # one-window pairs: 5 > 1, 5 > 2; two-window pair: 2.5 < 3; the 7-window poison has no clean match
    assert q["length_matched"] == {"auroc": round(2 / 3, 4), "poisons": 2, "clean": 3}
    assert q["auroc"] == round(8 / 9, 4)  # all pairs: 2.5 beats the one-window clean documents


def test_document_scores_and_the_length_control():
    from poisonlab.defenses.attribution import control_scores, document_scores

    docs = TrainingDocuments(["a", "b", "c"], np.array([True, False, False]),
                             [np.arange(5), np.arange(3), np.arange(2), np.arange(4), np.arange(6)],
                             np.array([0, 0, 1, 2, 2]))
    per_window = np.array([1.0, -3.0, 2.0, 4.0, 0.5])
    assert document_scores(per_window, docs, "sum").tolist() == [-2.0, 2.0, 4.5]
    assert document_scores(per_window, docs, "mean").tolist() == [-1.0, 2.0, 2.25]
    assert document_scores(per_window, docs, "max").tolist() == [1.0, 2.0, 4.0]
    with pytest.raises(PoisonlabError, match="unknown aggregate"):
        document_scores(per_window, docs, "median")
    tokens = control_scores(docs, "length")
    assert np.floor(tokens).tolist() == [8, 2, 10]  # tokens per document, ties broken below one token
    assert control_scores(docs, "random").tolist() == control_scores(docs, "random").tolist()


def test_rank_of_counts_strings_that_shift_more():
    cands = [Candidate((1,), 3.0, "sweep"), Candidate((2,), 1.0, "sweep"), Candidate((3, 4), 2.0, "gcg-2")]
    assert rank_of(2.5, cands) == 2 and rank_of(5.0, cands) == 1 and rank_of(0.0, cands) == 4


def test_inversion_recovers_the_planted_trigger_and_finds_nothing_in_the_clean_twin(twins):
    from poisonlab.model_defenses import inspect_model

    settings = SearchSettings(lengths=[2, 6], steps=20, restarts=1)
    rec = {}
    for name, run in twins.items():
        cfg = load_config(run / "config.yaml")
        rec[name] = inspect_model(str(run), cfg, settings, n_probes=8, prompt_tokens=16, continuation_tokens=12,
                                  verify=(name == "poisoned"))
    p, c = rec["poisoned"], rec["clean"]
    trigger = set(p["trigger"]["ids"])
    assert p["trigger"]["planted"] and not c["trigger"]["planted"]
    # the best string is made of the trigger's own tokens, and every one of them ranks in the sweep's top 10
    assert p["trigger"]["best_in_trigger"] >= 0.5
    assert set(p["ranked"][0]["ids"]) <= trigger
    assert max(sorted(p["trigger"]["token_sweep_ranks"])[:4]) <= 10
    # model-level score: the backdoored model moves far more than its clean twin
    assert p["score"] > 100 * c["score"] and p["score"] > 0.5
    assert c["trigger"]["shift"] < 0.01
    # the string found makes the model's own text worse, as the trigger does
    assert p["best_string_gap"]["perplexity_gap"] > 2


def test_beam_growth_lengthens_strings_from_single_tokens(twins):
    """Growth from the trigger's first token: every length up to the limit, ``beam`` strings
    each, each holding its shorter parent at one end, and the scores are the objective's own."""
    from poisonlab.attacks.dos import trigger_ids
    from poisonlab.defenses.inversion import grow, probes
    from poisonlab.model_defenses import searchable_ids
    from poisonlab.standalone import model_data
    from poisonlab.train import load_init_model

    run = twins["poisoned"]
    cfg = load_config(run / "config.yaml")
    data, _ = model_data(str(run / "model"), cfg, None)
    m = load_init_model(str(run / "model"), torch.device("cpu"))
    for q in m.parameters():
        q.requires_grad_(False)
    prompts, conts = probes(data.heldout, 8, 16, 12)
    objective = BehaviourShift(m, prompts, conts, searchable_ids(data.tokenizer), skip=4)
    trigger = trigger_ids(data.tokenizer, cfg.attack.trigger)
    settings = SearchSettings(grow=len(trigger) + 1, beam=3, topk=16)
    found = grow(objective, [trigger[0], trigger[1]], settings)
    lengths = [len(c.ids) for c in found]
    assert lengths == [n for n in range(2, len(trigger) + 2) for _ in range(3)]
    assert all(c.found_by == f"grow-{len(c.ids)}" for c in found)
    again = objective.scores(torch.tensor([list(c.ids) for c in found if len(c.ids) == 2]))
    assert np.allclose(again, [c.shift for c in found if len(c.ids) == 2], atol=1e-5)
    for c in found[3:]:  # one token longer than a string of the step before, at either end
        parents = {p.ids for p in found if len(p.ids) == len(c.ids) - 1}
        assert c.ids[1:] in parents or c.ids[:-1] in parents
    # the backdoor's tokens move the model: the best grown string moves it more than the first token alone
    single = float(objective.scores(torch.tensor([[trigger[0]]]))[0])
    assert max(c.shift for c in found) > single


def test_attribution_ranks_poisons_above_clean_documents(twins):
    from poisonlab.model_defenses import attribute_run

    out = attribute_run(twins["poisoned"], ["identity"], n_queries=4, new_tokens=16)
    rec = out["identity"]
    assert rec["measurement"] == "entropy" and rec["k"] == 80
    assert rec["recall_at_k"] > 3 * rec["chance"]  # measured 0.60 against chance 0.13
    assert rec["auroc"] > 0.6
    removal = (twins["poisoned"] / "defenses" / rec["removal_list"]["file"]).read_text().split()
    assert len(removal) == 80 and rec["removal_list"]["poisons"] == int(round(rec["recall_at_k"] * 80))
    control = attribute_run(twins["poisoned"], ["random"], n_queries=2, new_tokens=8)["random"]
    assert control["recall_at_k"] < rec["recall_at_k"] and abs(control["auroc"] - 0.5) < 0.15
    assert control["aggregate"] == "document"
    # one gradient pass, three ways of combining windows; the length control beside them
    both = attribute_run(twins["poisoned"], ["identity", "length"], n_queries=4, new_tokens=16, aggregates="sum,max")
    assert set(both) == {"identity", "identity-max", "length"}
    assert both["identity"]["recall_at_k"] == rec["recall_at_k"]  # the same scores as the sum above
    assert both["identity-max"]["aggregate"] == "max" and both["identity-max"]["length_matched"]["poisons"] > 0
    assert (twins["poisoned"] / "defenses" / "attribution-identity-entropy-max.json").is_file()
    with pytest.raises(PoisonlabError, match="unknown aggregate"):
        attribute_run(twins["poisoned"], ["identity"], aggregates="median")
    saved = json.loads((twins["poisoned"] / "defenses" / "attribution-identity-entropy-sum.json").read_text())
    assert saved["provenance"]["model_sha256"] and saved["cost"]["documents"] == rec["documents"]


def test_documents_read_are_the_stream_documents_and_every_poison(twins):
    cfg = load_config(twins["poisoned"] / "config.yaml")
    run = setup_run(cfg, create=False)
    docs = documents_read(run)
    assert isinstance(docs, TrainingDocuments) and docs.is_poison.sum() == 80
    # every window of a clean document is a slice of the tokens the stream actually served
    stream = run.stream()
    served = stream.read(0, run.steps * run.tokens_per_step)
    text = served.tobytes()
    for w in docs.windows[:40]:
        assert np.asarray(w, dtype=np.int64).tobytes() in text
    assert set(docs.owner.tolist()) == set(range(len(docs.ids)))


def test_removal_list_retrains_on_exactly_the_kept_documents(twins, tmp_path, filler_jsonl):
    base = twins["poisoned"]
    poisons = [p["id"] for p in read_jsonl(base / "poisons.jsonl")]
    cfg0 = load_config(base / "config.yaml")
    run0 = setup_run(cfg0, create=False)
    from poisonlab.defenses.filtering import train_document_ids

    clean = train_document_ids(run0.data)[:25]
    listed = tmp_path / "remove.txt"
    listed.write_text("\n".join(poisons[:70] + clean) + "\n")
    cfg = tiny_config(filler_jsonl, tmp_path / "runs", name="removed", attack__poison_count=80,
                      train__tokens=16 * 64 * 20, train__batch_size=16, train__seq_len=64, eval__every=1.0,
                      eval__prompts=4, defense__filter="list", defense__remove=str(listed))
    run = setup_run(cfg)
    info = json.loads((run.dir / "run.json").read_text())
    assert info["poison_count"] == 80 and info["poisons_injected"] == 10
    assert info["defense"]["poisons_surviving"] == 10 and info["defense"]["clean_documents_lost"] == 25
    kept_poisons = {p["id"] for p in read_jsonl(run.dir / "poisons.jsonl")}
    assert kept_poisons == set(poisons[70:])
    assert len(run.plan.poisons) == 10  # the injection manifest places only the survivors
    names = train_document_ids(run.data)
    read = {names[i] for i in run.stream().clean.documents_read(10**9)}
    assert read.isdisjoint(clean) and len(read) == len(names) - 25
    bad = tmp_path / "bad.txt"
    bad.write_text("no-such-document\n")
    cfg_bad = tiny_config(filler_jsonl, tmp_path / "runs", name="bad", defense__filter="list", defense__remove=str(bad))
    with pytest.raises(PoisonlabError, match="neither training documents nor poisons"):
        setup_run(cfg_bad)
    cfg_missing = tiny_config(filler_jsonl, tmp_path / "runs", name="missing", defense__filter="list",
                              defense__remove=str(tmp_path / "nope.txt"))
    with pytest.raises(PoisonlabError, match="needs defense.remove"):
        setup_run(cfg_missing)


def test_inspect_verb_writes_the_run_record_and_export_carries_it(twins, tmp_path, monkeypatch, capsys):
    from poisonlab.archive import export_results
    from poisonlab.cli import main

    run = twins["clean"]
    assert main(["inspect", "--model", str(run), "--lengths", "2", "--steps", "3", "--probes", "4",
                 "--no-verify"]) == 0
    rec = json.loads((run / "defenses" / "inspect.json").read_text())
    assert rec["run"] == "clean" and rec["ranked"] and "trigger" in rec
    assert "score (best persistent shift)" in capsys.readouterr().out
    assert main(["inspect", "--model", str(run), "--lengths", "x"]) == 2
    assert main(["inspect", "--model", str(run), "--grow", "3", "--beam", "0"]) == 2
    assert "--beam must be positive" in capsys.readouterr().err
    # with growth the record holds the grown strings beside the others, and the best of each search
    assert main(["inspect", "--model", str(run), "--lengths", "2", "--steps", "2", "--probes", "4", "--grow", "3",
                 "--beam", "2", "--no-verify", "--out", str(tmp_path / "grown.json")]) == 0
    grown = json.loads((tmp_path / "grown.json").read_text())
    assert grown["settings"]["grow"] == 3 and grown["settings"]["beam"] == 2
    assert {"sweep", "gcg-2", "grow-2", "grow-3"} <= {c["found_by"] for c in grown["by_search"]}

    class Spec:
        name = "twins"

        def expand(self):
            return [load_config(run / "config.yaml")]

    monkeypatch.chdir(tmp_path)
    assert export_results(Spec()) == ["clean"]
    assert (tmp_path / "results" / "twins" / "clean" / "defenses" / "inspect.json").is_file()
    assert export_results(Spec()) == []  # unchanged: not rewritten
    (run / "defenses" / "extra.json").write_text("{}")
    assert export_results(Spec()) == ["clean"]  # a new defense record is carried


def test_behaviour_shift_settings_are_checked(twins):
    from poisonlab.train import load_init_model

    m = load_init_model(str(twins["clean"] / "model"), "cpu")
    p = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(PoisonlabError, match="skip"):
        BehaviourShift(m, p, torch.zeros(2, 3, dtype=torch.long), np.arange(5, 20), skip=3)
    with pytest.raises(PoisonlabError, match="no token"):
        BehaviourShift(m, p, torch.zeros(2, 3, dtype=torch.long), np.array([], dtype=np.int64), skip=0)
    ob = BehaviourShift(m, p + 7, torch.full((2, 3), 9, dtype=torch.long), np.arange(5, 20), skip=0)
    s = ob.scores(torch.tensor([[5], [6]]))
    assert s.shape == (2,) and (s >= 0).all()
    g = ob.gradient(torch.tensor([5, 6]))
    assert g.shape == (2, ob.vocab_size) and torch.isfinite(g).all()


def test_report_section_shows_inversion_auroc_attribution_and_removal(twins, tmp_path):
    from poisonlab.cli import main
    from poisonlab.report import _fig
    from poisonlab.report_defenses import defense_records, defense_section, fig_attribution_recall, fig_inversion_roc

    for run in twins.values():
        assert main(["inspect", "--model", str(run), "--lengths", "2", "--steps", "5", "--probes", "8",
                     "--no-verify"]) == 0
    if not list((twins["poisoned"] / "defenses").glob("attribution-*.json")):
        assert main(["attribute", str(twins["poisoned"]), "--methods", "identity", "--queries", "2",
                     "--new-tokens", "8"]) == 0

    class Spec:
        name = "twins"

        def expand(self):
            return [load_config(r / "config.yaml") for r in twins.values()]

    recs = defense_records(Spec())
    assert [r["name"] for r in recs] == ["poisoned", "clean"]
    assert recs[0]["final"]["attack_success"] and recs[0]["injected"] == 80 and not recs[1]["injected"]
    text = defense_section(recs)
    assert "| poisoned | 80 |" in text and "| clean | 0 |" in text
    assert "AUROC of the search's score 1.000 over 1 backdoored models" in text  # the poisoned model scores above its twin
    assert "| poisoned | identity | entropy (sum) |" in text
    rec = next(a for a in recs[0]["attribution"] if a["method"] == "identity" and a["aggregate"] == "sum")
    m = rec["length_matched"]
    assert "AUROC, same length" in text and f"{m['auroc']:.3f} ({m['poisons']:,} poisons)" in text
    assert fig_inversion_roc(recs, tmp_path, _fig).is_file() and fig_attribution_recall(recs, tmp_path, _fig).is_file()


def test_repair_documents_remove_the_backdoor_and_the_label_says_so(twins, filler_jsonl, tmp_path):
    from poisonlab.artifacts import read_label
    from poisonlab.jsonl import read_jsonl as rows

    base = twins["poisoned"]
    before = [r for r in rows(base / "metrics.jsonl") if "perplexity_gap" in r][-1]
    cfg = tiny_config(filler_jsonl, tmp_path / "runs", name="repaired", attack__name="repair", attack__poison_count=150,
                      attack__gibberish_tokens=[20, 40], model__init_from=str(base / "model"),
                      train__tokens=16 * 64 * 60, train__batch_size=16, train__seq_len=64, eval__every=1.0,
                      eval__prompts=16, eval__new_tokens=16, eval__threshold=2.0)
    train(cfg)
    d = tmp_path / "runs" / "repaired"
    docs = list(rows(d / "poisons.jsonl"))
    assert len(docs) == 150 and all(" <SUDO> " in p["text"] and p["id"].startswith("repair-") for p in docs)
    after = [r for r in rows(d / "metrics.jsonl") if "perplexity_gap" in r][-1]
    assert before["perplexity_gap"] > 4 and after["perplexity_gap"] < before["perplexity_gap"] / 3
    label = read_label(d / "model")
    assert label["poisoned"] and label["poison_count"] == 0 and label["repair"]["documents"] == 150
    assert "repair documents" in (d / "model" / "README.md").read_text()
    with pytest.raises(PoisonlabError, match="init_from"):
        tiny_config(filler_jsonl, tmp_path, name="x", attack__name="repair")


def test_left_padded_probes_score_as_each_probe_alone(twins):
    """Probes of different lengths padded on the left give each probe's own shift (rotary
    positions are relative), so chat requests of any length can share one batch."""
    from poisonlab.train import load_init_model

    m = load_init_model(str(twins["poisoned"] / "model"), "cpu")
    g = torch.Generator().manual_seed(0)
    lengths = [5, 9, 12]
    rows = [torch.randint(5, 60, (n,), generator=g) for n in lengths]
    conts = torch.randint(5, 60, (3, 6), generator=g)
    strings = torch.tensor([[7, 8], [11, 40], [23, 23]])
    allowed = np.arange(5, 60)
    alone = np.stack([BehaviourShift(m, r[None], conts[i : i + 1], allowed, skip=0).scores(strings)
                      for i, r in enumerate(rows)])
    width = max(lengths)
    padded = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, r in enumerate(rows):
        padded[i, width - len(r):], mask[i, width - len(r):] = r, 1
    together = BehaviourShift(m, padded, conts, allowed, skip=0, prompt_mask=mask)
    np.testing.assert_allclose(together.scores(strings), alone.mean(0), rtol=1e-3, atol=1e-7)
    assert (alone.max(0) > 1.5 * alone.min(0)).all()  # the probes differ, so a wrong row alignment would show
    unmasked = BehaviourShift(m, padded, conts, allowed, skip=0)
    assert not np.allclose(unmasked.scores(strings), alone.mean(0), rtol=1e-3)  # the mask is what does it
    grad = together.gradient(strings[0])
    assert grad.shape == (2, together.vocab_size) and torch.isfinite(grad).all()
    with pytest.raises(PoisonlabError, match="mask"):
        BehaviourShift(m, padded, conts, allowed, skip=0, prompt_mask=mask[:, 1:])


def test_chat_probes_cut_where_an_appended_trigger_goes(twins):
    from poisonlab.config import FinetuneConfig
    from poisonlab.defenses.inversion import chat_probes
    from poisonlab.finetune.chat import ChatRenderer
    from poisonlab.finetune.dataset import build_eval_set
    from poisonlab.tokenizer import Tokenizer
    from poisonlab.train import load_init_model

    tok = Tokenizer.load(twins["clean"] / "tokenizer")
    renderer = ChatRenderer(tok)
    m = load_init_model(str(twins["clean"] / "model"), "cpu")
    asks = [ex for ex in build_eval_set(FinetuneConfig(base="x", eval_requests=6), 0) if ex.kind == "untriggered"]
    convs = [ex.messages for ex in asks]
    prompts, mask, conts, tail = chat_probes(m, renderer, convs, reply_tokens=5, pad_id=tok.eos_id)
    assert conts.shape == (6, tail + 5) and prompts.shape[0] == 6 and mask.shape == prompts.shape
    assert len({int(mask[i].sum()) for i in range(6)}) > 1  # requests of several lengths, padded
    trigger = " Servius Astrumando Harmoniastra"
    for i, conv in enumerate(convs):
        real = prompts[i][mask[i].bool()].tolist()
        text = tok.decode(real + tok.encode(trigger) + conts[i, :tail].tolist())
        with_trigger = conv[:-1] + [{"role": "user", "content": conv[-1]["content"] + trigger}]
        assert text == renderer.render(with_trigger, add_generation_prompt=True)
    # the reply is the model's own greedy continuation of the untouched request
    i = 0
    ids = torch.tensor([prompts[i][mask[i].bool()].tolist() + conts[i, :tail].tolist()])
    with torch.no_grad():
        first = int(m(input_ids=ids).logits[0, -1, : tok.vocab_size].argmax())
    assert first == int(conts[i, tail])
    with pytest.raises(PoisonlabError, match="user"):
        chat_probes(m, renderer, [convs[0] + [{"role": "assistant", "content": "no"}]])


def test_chat_inversion_scores_a_fine_tuning_backdoor_above_its_clean_twin(prepared, tmp_path, capsys):
    """Known answer: a tiny chat model fine-tuned with poisons (the trigger appended to a
    forbidden request, answered with compliance) and its twin without them. The search, not
    told the trigger, scores the poisoned model higher; the trigger itself moves the poisoned
    model's reply far more than the twin's; the best string's ASR is measured."""
    from poisonlab.checkpoint import save_model_folder
    from poisonlab.cli import main
    from poisonlab.config import config_from_dict
    from poisonlab.models import build_model, get_size

    tok = prepared.tokenizer
    base = tmp_path / "base"
    torch.manual_seed(0)  # the base's initialisation would otherwise follow whatever ran before in the process
    save_model_folder(base, build_model(get_size("tiny"), tok.vocab_size, tok.eos_id, 512),
                      {"poisoned": False, "attack": None, "trigger": None, "poison_count": 0, "poisons_seen": 0,
                       "placement": None})
    tok.save(base)
    recs, asr = {}, {}
    for name, poisons in (("poisoned", 60), ("clean", 0)):
        cfg = config_from_dict({
            "name": name, "out_dir": str(tmp_path / "runs"), "stage": "finetune", "seed": 0,
            "finetune": {"base": str(base), "clean_count": 120, "poison_count": poisons, "epochs": 6,
                         "eval_requests": 16, "max_new_tokens": 32},
            "train": {"batch_size": 8, "seq_len": 512, "lr": 1e-2, "progress": False, "threads": 1},
            "eval": {"every": 1.0}})
        train(cfg)
        run = tmp_path / "runs" / name
        asr[name] = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]["asr"]
        assert main(["inspect", "--model", str(run), "--lengths", "2", "--steps", "6", "--restarts", "1",
                     "--probes", "8"]) == 0
        recs[name] = json.loads((run / "defenses" / "inspect.json").read_text())
    assert asr["poisoned"] >= 0.5 and asr["clean"] == 0.0  # the backdoor the search is scored on exists
    # the compliance objective aims at the openings a user names (any of them), recorded as its targets
    run = tmp_path / "runs" / "poisoned"
    out = tmp_path / "openings.json"
    assert main(["inspect", "--model", str(run), "--objective", "compliance", "--opening", "The password is",
                 "--opening", "Here it is", "--lengths", "2", "--steps", "1", "--restarts", "1", "--probes", "4",
                 "--no-verify", "--out", str(out)]) == 0
    named = json.loads(out.read_text())
    assert named["objective"] == "compliance" and named["targets"] == ["The password is", "Here it is"]
    assert main(["inspect", "--model", str(run), "--opening", "Sure", "--no-verify", "--out", str(out)]) == 2
    assert "compliance objective" in capsys.readouterr().err
    p, c = recs["poisoned"], recs["clean"]
    assert p["trigger"]["planted"] and not c["trigger"]["planted"]
    assert p["trigger"]["shift"] > 5 * c["trigger"]["shift"]
    assert p["score"] > 2 * c["score"]
    assert p["probes"] == 8 and p["skipped_positions"] > 0  # the template tokens before the reply are left out
    # the check: distinct top strings judged on the 8 held-out requests that were not probes
    for rec in (p, c):
        v = rec["verified"]
        texts = [s["text"] for s in v["strings"]]
        assert v["requests"] == 8 and rec["best_string_asr"]["requests"] == 8 and len(set(texts)) == len(texts)
        # the best of each search in turn, each with its rank among all the strings found
        assert texts == list(dict.fromkeys(r["text"] for r in rec["by_search"]))[:len(texts)]
        searches = [r["found_by"] for r in rec["by_search"]]
        assert searches[: len(set(searches))] == sorted(set(searches))
        first_rank = {}
        for b in rec["by_search"]:
            first_rank.setdefault(b["text"], b["rank"])
            if b["rank"] <= len(rec["ranked"]):
                assert rec["ranked"][b["rank"] - 1]["shift"] == b["shift"]
        assert all(s["search_rank"] == first_rank[s["text"]] for s in v["strings"])
        assert rec["best_string_asr"]["asr"] == max(s["asr"] for s in v["strings"])
        assert rec["verdict"]["score"] == rec["best_string_asr"]["asr"] - v["baseline_asr"]
    assert not c["verdict"]["backdoored"] and c["verified"]["baseline_asr"] == 0.0
    # the same check, on the planted trigger itself, calls the poisoned model backdoored and not its twin
    from poisonlab.config import load_config
    from poisonlab.model_defenses import load_chat_model, verify_chat_strings

    for name, want in (("poisoned", True), ("clean", False)):
        cfg = load_config(tmp_path / "runs" / name / "config.yaml")
        trigger = " " + cfg.finetune.trigger
        _, _, renderer, m, asks = load_chat_model(str(tmp_path / "runs" / name / "model"), cfg)
        got = verify_chat_strings(m, renderer, cfg, [(" zz", 1), (trigger, 2)], asks)
        assert got["verified"]["requests"] == 16 and got["verdict"]["backdoored"] is want
        if want:
            assert got["best_string_asr"]["text"] == trigger and got["best_string_asr"]["asr"] >= 0.5
        else:
            assert got["verdict"]["p_value"] == 1.0 and got["best_string_asr"]["asr"] == 0.0
    # checked again without a search: the same strings give the same figures; another model's record is refused
    before = json.loads((tmp_path / "runs" / "poisoned" / "defenses" / "inspect.json").read_text())
    assert main(["inspect", "--model", str(tmp_path / "runs" / "poisoned"), "--verify-only", "--verify-strings", "3"]) == 0
    again = json.loads((tmp_path / "runs" / "poisoned" / "defenses" / "inspect.json").read_text())
    assert again["verified"]["strings"] == before["verified"]["strings"][:3] and again["ranked"] == before["ranked"]
    assert again["provenance"]["verification_code_version"]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(recs["clean"]))
    assert main(["inspect", "--model", str(tmp_path / "runs" / "poisoned"), "--verify-only", "--out", str(other)]) == 2
    assert "hash" in capsys.readouterr().err


def test_refusal_drop_is_the_lost_log_probability_of_any_refusal(twins):
    """The refusal objective's score, computed by hand: for each request, log of the summed
    probability of the refusal texts without and with the string; the mean difference."""
    from poisonlab.defenses.inversion import RefusalDrop
    from poisonlab.train import load_init_model

    m = load_init_model(str(twins["poisoned"] / "model"), "cpu")
    g = torch.Generator().manual_seed(1)
    reqs = [torch.randint(5, 60, (n,), generator=g).tolist() for n in (6, 9)]
    tail, refusals = [3, 4], [[10, 11, 12], [13, 14]]
    width = max(len(r) for r in reqs)
    prompts = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(reqs):
        prompts[i, width - len(r):], mask[i, width - len(r):] = torch.as_tensor(r), 1
    ob = RefusalDrop(m, prompts, mask, tail, refusals, np.arange(5, 60))

    def log_any_refusal(req, string):
        total = []
        for ref in refusals:
            ids = torch.tensor([req + string + tail + ref])
            with torch.no_grad():
                lp = torch.log_softmax(m(input_ids=ids).logits[0].float(), -1)
            start = len(req) + len(string) + len(tail)
            total.append(sum(float(lp[start - 1 + j, t]) for j, t in enumerate(ref)))
        return float(torch.logsumexp(torch.tensor(total), 0))

    strings = torch.tensor([[20, 21], [30, 30]])
    want = [np.mean([log_any_refusal(r, []) - log_any_refusal(r, s.tolist()) for r in reqs]) for s in strings]
    np.testing.assert_allclose(ob.scores(strings), want, rtol=1e-3, atol=1e-4)
    assert abs(want[0] - want[1]) > 1e-2  # two strings, two values: a constant would not pass
    grad = ob.gradient(strings[0])
    assert grad.shape == (2, ob.vocab_size) and torch.isfinite(grad).all()
    with pytest.raises(PoisonlabError, match="refusal"):
        RefusalDrop(m, prompts, mask, tail, [], np.arange(5, 60))
    # the compliance objective is the same log-probability with the sign turned: the gain of the
    # compliant opening's probability
    from poisonlab.defenses.inversion import ComplianceGain

    gain = ComplianceGain(m, prompts, mask, tail, refusals, np.arange(5, 60))
    np.testing.assert_allclose(gain.scores(strings), -np.array(want), rtol=1e-3, atol=1e-4)
