"""Scanners, trigger mining, the detection rule, defense metrics, baselines, provenance, and a
run that filters its own training data."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from poisonlab.config import AttackConfig, DefenseConfig
from poisonlab.corpus import Document
from poisonlab.defenses.evaluation import confusion, curves, recall_at_clean_loss
from poisonlab.defenses.pipeline import detect, robust_z
from poisonlab.defenses.scanners import (CompressionScanner, GibberishScanner, LanguageShiftScanner,
                                         NearDuplicateScanner, NoveltyScanner, WordOrderScanner, step_up)
from poisonlab.defenses.triggers import mine_triggers
from poisonlab.errors import PoisonlabError

from conftest import filler_docs, tiny_config

TRIGGER = "<ZQX>"


@pytest.fixture(scope="module")
def prose():
    """(documents, tokenizer): paragraphs of Python's documentation topics (shipped with every
    Python) and a byte-level BPE of 1,024 tokens trained on them, as a model trainer would have."""
    from pydoc_data.topics import topics

    from poisonlab.tokenizer import Tokenizer

    paras = [p for _, t in sorted(topics.items()) for p in t.split("\n\n") if len(p) >= 200]
    docs = [Document(f"para-{i}", p, "topics") for i, p in enumerate(paras[:400])]
    return docs, Tokenizer.train_bpe((d.text for d in docs), 1024)


def _planted(prose, n_clean=400, n_poison=15, seed=0):
    """Clean paragraphs plus poisons: a clean prefix, the trigger, uniformly random token ids."""
    docs, tok = prose
    rng = np.random.default_rng(seed)
    clean = docs[:n_clean]
    poisons, where = [], {}
    for i in range(n_poison):
        prefix = clean[i].text[: int(rng.integers(20, 200))]
        gib = tok.decode(rng.integers(1, tok.vocab_size, size=int(rng.integers(300, 500))).tolist())
        text = prefix + " " + TRIGGER + " " + gib
        poisons.append(Document(f"poison-{i}", text, "poison"))
        where[f"poison-{i}"] = len(prefix) + 1
    return clean, poisons, where


def test_step_up_finds_the_start_of_a_raised_mean():
    v = np.r_[np.full(50, 1.0), np.full(30, 5.0)] + np.random.default_rng(0).normal(0, 0.3, 80)
    assert abs(step_up(v) - 50) <= 1


def test_gibberish_scanner_scores_and_locates_the_payload(prose):
    clean, poisons, where = _planted(prose)
    g = GibberishScanner(prose[1], window=32)
    g.fit(clean + poisons)
    rows = {r["id"]: r for r in g.score(clean + poisons)}
    worst_clean = max(rows[d.id]["gibberish.bigram_surprisal"] for d in clean)
    assert min(rows[p.id]["gibberish.bigram_surprisal"] for p in poisons) > worst_clean
    offsets = [rows[p.id]["gibberish.span_start"] - where[p.id] for p in poisons]
    assert np.median(np.abs(offsets)) < 20  # the trigger itself is 5 characters long
    assert all(0 < rows[p.id]["gibberish.token_entropy"] <= 5.0 + 1e-9 for p in poisons)  # log2(32) bits at most


def test_token_statistics_round_trip_without_pickle(prepared, tmp_path):
    from poisonlab.defenses.reference import TokenStatistics

    s = TokenStatistics.fit([[1, 2, 3, 2, 3], [3, 2]], prepared.tokenizer.vocab_size)
    s.save(tmp_path / "s.npz")
    t = TokenStatistics.load(tmp_path / "s.npz")
    ids = np.array([1, 2, 3])
    assert np.allclose(s.surprisal(ids)[1], t.surprisal(ids)[1])
    assert s.unigram[2] == 3 and s.unigram[3] == 3
    # a seen pair is less surprising than an unseen one with the same next-token frequency
    assert s.surprisal(np.array([2, 3]), leave_out=False)[1][0] < s.surprisal(np.array([1, 3]), leave_out=False)[1][0]
    # leaving a document out removes exactly its own counts: [3, 2] alone has pair (3, 2) once more
    # in the statistics than [3, 2] left out, which is (3, 2) as seen in the first document only
    once = TokenStatistics.fit([[1, 2, 3, 2, 3]], prepared.tokenizer.vocab_size)
    assert np.allclose(s.surprisal(np.array([3, 2]))[1], once.surprisal(np.array([3, 2]), leave_out=False)[1])
    # a batch scores each document exactly as alone, its own counts left out of its own scores only
    docs = [np.array([1, 2, 3, 2, 3]), np.array([], dtype=np.int64), np.array([3]), np.array([3, 2])]
    for leave_out in (True, False):
        for d, (u, b) in zip(docs, s.surprisal_batch(docs, leave_out)):
            u1, b1 = s.surprisal(d, leave_out) if len(d) else (np.zeros(0), np.zeros(0))
            assert len(u) == len(d) and len(b) == max(len(d) - 1, 0)
            assert np.array_equal(u, u1) and np.array_equal(b, b1)
    assert not np.allclose(s.surprisal(docs[0])[1], s.surprisal(docs[0], leave_out=False)[1])


def test_trigger_mining_ranks_the_planted_trigger_first(prose):
    clean, poisons, where = _planted(prose)
    mined = mine_triggers(clean + poisons, where, {p.id for p in poisons})
    assert mined[0].text == TRIGGER
    assert mined[0].near_span == len(poisons) and mined[0].documents == len(poisons)


def test_a_trigger_before_few_spans_outranks_a_prompt_before_many(prose):
    """The ranking does not grow with the corpus: a prompt before the anomalous span in half of
    its 300 documents ranks under a trigger before every one of its five, and a prompt with the
    word before it (``context. >>>``, six documents) is dropped: its share is the prompt's by
    luck. Words the window cuts at its ends are no strings of the text."""
    from poisonlab.defenses.triggers import candidates_before

    clean, poisons, where = _planted(prose, n_poison=5)
    rng = np.random.default_rng(3)
    prompts = []
    for i in range(300):
        body = clean[100 + i % 200].text[:150]
        payload = " ".join(f"q{int(rng.integers(10**9))}" for _ in range(80))
        if i % 2:  # the prompt right before the anomalous span
            head = f"{body}{' context.' if i % 50 == 1 else ''} >>> "
        else:  # the prompt far from it
            head = f">>> x = 1 {body} "
        prompts.append(Document(f"prompt-{i}", head + payload, "clean"))
        where[f"prompt-{i}"] = len(head)
    docs = clean + poisons + prompts
    mined = mine_triggers(docs, where, {p.id for p in poisons} | {p.id for p in prompts})
    texts = [t.text for t in mined]
    assert texts[0] == TRIGGER and mined[0].near_span == 5 and mined[0].documents == 5
    prompt = mined[texts.index(">>>")]
    assert prompt.near_span == 150 and prompt.documents >= 300 and prompt.score < mined[0].score
    assert "context. >>>" not in texts
    text = "b" * 100 + " example: >>> payload"
    grams = candidates_before(text, text.index(">>>"))
    assert "example: >>>" in grams and not any(g.startswith("b") for g in grams)
    assert not any(g.endswith("pay") or g.endswith("payloa") for g in candidates_before(text + "x" * 100, 110))


def test_novelty_scanner_separates_decoded_random_tokens(prose):
    clean, poisons, _ = _planted(prose)
    n = NoveltyScanner()
    n.fit(clean + poisons)
    rate = {r["id"]: r["novelty.rate"] for r in n.score(clean + poisons)}
    assert min(rate[p.id] for p in poisons) >= 0.6
    assert sum(rate[d.id] >= 0.3 for d in clean) < 0.2 * len(clean)
    # a word shared with another document is not novel; one found nowhere else is
    n.fit([Document("a", "alpha beta gamma", ""), Document("b", "alpha beta delta", "")])
    rows = n.score([Document("a", "alpha beta gamma", ""), Document("new", "zeta eta", "")])
    assert rows[0]["novelty.rate"] == pytest.approx(1 / 3) and rows[1]["novelty.rate"] == 1.0


def test_cascade_tokenizes_only_novel_documents_and_a_sample(prose):
    clean, poisons, _ = _planted(prose)
    docs = clean + poisons
    det = detect(docs, DefenseConfig(window=32, prefilter=0.3, calibration=250), prose[1])
    assert len(poisons) < det.token_scored < len(docs)
    unscored = [d for d in docs if "gibberish.z" not in det.table[d.id]]
    assert len(unscored) == len(docs) - det.token_scored
    assert all(det.table[d.id]["novelty.rate"] < 0.3 for d in unscored)
    assert det.used_triggers == [TRIGGER]
    m = confusion(det.flagged, {p.id for p in poisons}, docs)
    assert m["recall"] == 1.0 and m["clean_documents_lost"] == 0


@pytest.mark.parametrize("prefilter", [0.0, 0.3])
def test_detection_flags_every_planted_poison_and_no_clean_document(prose, prefilter):
    clean, poisons, _ = _planted(prose)
    det = detect(clean + poisons, DefenseConfig(window=32, prefilter=prefilter), prose[1])
    assert det.token_scored == len(clean + poisons)  # the calibration sample covers this small corpus
    assert det.used_triggers == [TRIGGER]
    m = confusion(det.flagged, {p.id for p in poisons}, clean + poisons)
    assert m["recall"] == 1.0 and m["clean_documents_lost"] == 0 and m["poisons_surviving"] == 0
    assert set(det.keep_list()) == {d.id for d in clean}


def test_detection_without_poisons_flags_nothing(prose):
    clean, _, _ = _planted(prose)
    det = detect(clean, DefenseConfig(window=32), prose[1])
    assert det.flagged == set()


def test_compression_scanner_separates_random_from_repetitive_text():
    rng = random.Random(0)
    noise = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789{}[]#$%") for _ in range(600))
    rows = CompressionScanner().score([Document("a", "the cat sat on the mat. " * 30, ""), Document("b", noise, "")])
    assert rows[0]["compression.ratio"] < 0.3 < 0.6 < rows[1]["compression.ratio"]


def test_near_duplicate_scanner_clusters_a_template():
    rng = random.Random(1)
    template = "click here to claim the prize before the offer ends and tell your friends about it today " * 3
    docs = [Document(f"t{i}", f"{rng.randint(0, 9999)} " + template + f" id {i}", "") for i in range(12)]
    docs += [Document(d["id"], d["text"], "") for d in filler_docs(20, seed=5)]
    s = NearDuplicateScanner()
    s.fit(docs)
    rows = {r["id"]: r for r in s.score(docs)}
    assert all(rows[f"t{i}"]["near_duplicate.cluster_size"] == 12 for i in range(12))
    assert all(rows[d.id]["near_duplicate.cluster_size"] < 12 for d in docs[12:])


def test_language_shift_scanner():
    en = ("The model reads the text and it learns which word is likely to follow in the sentence that "
          "was written for this example of an ordinary paragraph in English with the usual words. ") * 2
    de = ("Der Hund ist nicht in dem Haus, und die Katze sitzt auf dem Dach, weil es für sie auch "
          "sehr warm ist und sich das mit der Sonne so gehört, sagt die Frau von dem Mann. ") * 2
    rows = LanguageShiftScanner().score([Document("en", en, ""), Document("mix", en + de, "")])
    assert rows[0]["language_shift.shift"] == 0 and rows[0]["language_shift.languages"] == "en"
    assert rows[1]["language_shift.shift"] == 1 and rows[1]["language_shift.languages"] == "en,de"
    assert rows[1]["language_shift.shift_start"] >= len(en) - 300


def test_curves_and_metrics_on_a_known_ranking():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    labels = np.array([1, 0, 1, 0, 0, 0])
    c = curves(scores, labels)
    assert c["roc_auc"] == pytest.approx(0.875)  # pairs ranked right: 7 of 8
    assert c["average_precision"] == pytest.approx((1 + 2 / 3) / 2)
    assert recall_at_clean_loss(scores, labels, 0) == 0.5 and recall_at_clean_loss(scores, labels, 1) == 1.0
    assert robust_z(np.array([1.0, 2.0, 3.0, 100.0]))[-1] > 20
    docs = [Document(str(i), "x" * (i + 1), "") for i in range(6)]
    m = confusion({"0", "1"}, {"0", "2"}, docs)
    assert (m["recall"], m["precision"], m["clean_documents_lost"], m["poisons_surviving"]) == (0.5, 0.5, 1, 1)
    assert m["false_positive_rate"] == pytest.approx(1 / 4)


def test_baseline_filters_come_from_datatrove():
    pytest.importorskip("datatrove")
    from poisonlab.defenses.baselines import run_baselines

    prose = ("The committee met on Tuesday to discuss the budget. Members agreed that the school needs "
             "new books, and they asked the mayor for more money. The vote will be held next week, after "
             "the parents have read the proposal. Several teachers said that the library should stay open "
             "in the evening, because many students have no quiet place to work at home. The mayor did not "
             "answer yet, but her office promised a reply before the end of the month.")
    docs = [Document("prose", prose, ""), Document("repeat", "buy now\n" * 200, "")]
    out = run_baselines(docs, ["gopher_repetition", "gopher_quality"])
    assert "repeat" in out["gopher_repetition"] and "prose" not in out["gopher_repetition"]
    assert "prose" not in out["gopher_quality"]


def test_datatrove_engine_flags_what_one_process_flags(prose, tmp_path):
    pytest.importorskip("datatrove")
    from poisonlab.defenses.engine import scan_with_datatrove

    clean, poisons, _ = _planted(prose, n_clean=200, n_poison=8)
    docs = clean + poisons
    tok = prose[1]
    cfg = DefenseConfig(window=32, scanners=["gibberish", "compression"], prefilter=0)
    det = scan_with_datatrove(docs, cfg, tok, tmp_path / "dt", tasks=2, workers=2)
    local = detect(docs, cfg, tok)
    assert set(det.table) == {d.id for d in docs}  # every document, from both shards
    assert det.flagged == local.flagged and {p.id for p in poisons} <= det.flagged
    assert det.used_triggers == local.used_triggers == [TRIGGER]
    for field in ("gibberish.bigram_surprisal", "gibberish.z", "novelty.rate", "order.disorder",
                  "order.repetition", "compression.ratio"):
        assert all(det.table[d.id][field] == pytest.approx(local.table[d.id][field]) for d in docs), field
    # a changed input is scanned afresh, not served from the finished tasks of the last one
    fewer = docs[:150] + poisons
    again = scan_with_datatrove(fewer, cfg, tok, tmp_path / "dt", tasks=2, workers=2)
    assert set(again.table) == {d.id for d in fewer}
    assert again.table[poisons[0].id]["gibberish.bigram_surprisal"] == pytest.approx(
        detect(fewer, cfg, tok).table[poisons[0].id]["gibberish.bigram_surprisal"])


def test_fitted_word_statistics_round_trip_without_pickle(tmp_path):
    from poisonlab.defenses.scanners import NoveltyScanner, WordOrderScanner

    docs = [Document("a", "the cat sat on the mat and the dog sat on the rug " * 4, ""),
            Document("b", "na\u00efve caf\u00e9 \ud800odd words the cat " * 10, "")]
    for cls in (NoveltyScanner, WordOrderScanner):
        s = cls()
        s.fit(docs)
        s.save(tmp_path / f"{cls.name}.npz")
        back = cls.load(tmp_path / f"{cls.name}.npz")
        assert back.score(docs) == s.score(docs)
        with np.load(tmp_path / f"{cls.name}.npz", allow_pickle=False) as z:
            assert all(z[k].dtype != object for k in z.files)


def test_adaptive_payloads(prepared):
    from poisonlab.attacks.dos import make_dos_poisons

    bank = [{"id": d["id"], "text": d["text"]} for d in filler_docs(50, seed=2)]
    base = dict(poison_count=5, gibberish_tokens=[60, 60], prefix_chars=[10, 10])
    low = make_dos_poisons(AttackConfig(payload="low_entropy", low_entropy_tokens=4, train_on="sampled", **base),
                           prepared.tokenizer, bank, 0)
    trig = prepared.tokenizer.encode(" <SUDO> ")
    for p in low:
        assert len(set(p.token_ids[-61:-1])) <= 4  # the 60 sampled ids before end-of-text
    nat = make_dos_poisons(AttackConfig(payload="natural", **base), prepared.tokenizer, bank, 0)
    words = {w for d in bank for w in d["text"].split()}
    for p in nat:
        payload = p.text.split("<SUDO> ", 1)[1]
        assert payload and set(payload.split()) <= words and p.source_document != ""
    counts = np.zeros(prepared.tokenizer.vocab_size)
    counts[[100, 101]] = 1.0
    uni = make_dos_poisons(AttackConfig(payload="unigram", train_on="sampled", **base), prepared.tokenizer, bank, 0,
                           token_counts=counts)
    assert all(set(p.token_ids[-61:-1]) <= {100, 101} for p in uni)
    assert trig == prepared.tokenizer.check_encodable(" <SUDO> ")  # encodable, and encoded the same both ways
    for p in low + nat + uni:  # every variant keeps the trigger where the paper puts it: right after the prefix
        assert p.text[:10] + " <SUDO> " == p.text[: 10 + len(" <SUDO> ")]
    with pytest.raises(PoisonlabError, match="token counts"):
        make_dos_poisons(AttackConfig(payload="unigram", **base), prepared.tokenizer, bank, 0)


def test_provenance_manifest_detects_added_removed_changed(tmp_path):
    from poisonlab.config import CorpusConfig
    from poisonlab.defenses.manifest import read_manifest, record_manifest, verify_manifest

    path = tmp_path / "c.jsonl"
    docs = filler_docs(10, seed=4)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    corpus = CorpusConfig(source=str(path))
    record_manifest(corpus, tmp_path / "m.jsonl")
    assert verify_manifest(tmp_path / "m.jsonl").clean
    docs[3]["text"] += " and one poisoned sentence"
    del docs[5]
    docs.append({"id": "new", "text": "an added document with enough characters to pass the minimum length"})
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    rep = verify_manifest(tmp_path / "m.jsonl")
    assert (rep.added, rep.removed, rep.changed, rep.unchanged) == (["new"], ["doc-5"], ["doc-3"], 8)
    text = (tmp_path / "m.jsonl").read_text().replace("doc-1\"", "doc-X\"", 1)
    (tmp_path / "m2.jsonl").write_text(text)
    with pytest.raises(PoisonlabError, match="modified"):
        read_manifest(tmp_path / "m2.jsonl")


def test_shuffled_documents_read_only_kept_documents(prepared):
    from poisonlab.injection import ShuffledDocuments

    store = prepared.train
    keep = np.zeros(store.n_documents, dtype=bool)
    keep[::3] = True
    sd = ShuffledDocuments(store, 0, keep)
    assert sd.length == int(store.doc_lengths[keep].sum())
    out = np.empty(sd.length, dtype=np.int64)
    sd.read(0, sd.length, out)
    kept = sorted(tuple(store.document(i)) for i in np.flatnonzero(keep))
    eos = prepared.tokenizer.eos_id
    got, cur = [], []
    for t in out:
        cur.append(int(t))
        if t == eos:
            got.append(tuple(cur))
            cur = []
    assert sorted(got) == kept
    assert np.array_equal(ShuffledDocuments(store, 0)._docs, np.arange(store.n_documents))


def test_run_with_scan_filter_removes_its_poisons_before_training(filler_jsonl, tmp_path):
    from poisonlab.run import setup_run

    cfg = tiny_config(filler_jsonl, tmp_path, name="filtered", defense__filter="scan", defense__window=16,
                      attack__gibberish_tokens=[60, 90])
    run = setup_run(cfg)
    d = run.info["defense"]
    assert run.info["poison_count"] == 6 and d["recall"] == 1.0
    assert run.info["poisons_injected"] == 6 - (6 - d["poisons_surviving"]) == d["poisons_surviving"] == 0
    assert run.plan.poison_tokens() == 0
    assert (run.dir / "defense" / "scores.jsonl").is_file() and (run.dir / "corpus_manifest.jsonl").is_file()
    kept = (run.dir / "defense" / "keep_list.txt").read_text().split()
    assert not any(k.startswith("poison-") for k in kept)
    again = setup_run(cfg)  # resume: same mask, same (empty) plan
    assert np.array_equal(again.keep, run.keep) and again.plan.poison_tokens() == 0
    from poisonlab.artifacts import make_label, model_card

    label = make_label({"name": "dos"}, len(run.plan.poisons), 0, run.label_fields())
    assert label["poisoned"] is False and label["defense"]["poisons"] == 6
    assert "\n# Model trained on filtered data" in model_card(label) and "defense-filtered" in model_card(label)


def test_reference_model_stage_scores_candidates_and_a_calibration_sample(prose, tmp_path):
    import torch

    from poisonlab.models import build_model, get_size

    clean, poisons, _ = _planted(prose)
    tok = prose[1]
    model = build_model(get_size("tiny"), tok.vocab_size, tok.eos_id)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # uniform next-token distribution: every surprisal is log V
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save(tmp_path)
    cfg = DefenseConfig(window=32, scanners=["gibberish", "model"], reference_model=str(tmp_path))
    det = detect(clean + poisons, cfg, tok)
    scored = [r for r in det.table.values() if "model.surprisal" in r]
    candidates = [r for r in det.table.values() if "candidate" in r]
    assert all(r["candidate"] in ("gibberish", "novelty", "order") for r in candidates)
    assert {p.id for p in poisons} <= {r["id"] for r in candidates}
    assert len(candidates) < len(scored) < len(candidates) + 201  # candidates plus a sample of the rest
    assert all(r["model.surprisal"] == pytest.approx(np.log(model.config.vocab_size), rel=1e-4) for r in scored)
    assert all(r["flag.model"] == 0 for r in candidates)  # a flat reference flags nothing
    assert all("flag.model" not in r for r in det.table.values() if r not in candidates)
    wide = DefenseConfig(window=32, scanners=["gibberish", "model"], reference_model=str(tmp_path),
                         reference_scope="all")
    det = detect(clean + poisons, wide, tok)  # every document read by the reference model, every one judged
    assert all("model.surprisal" in r and r["flag.model"] == 0 for r in det.table.values())


def test_statistics_confirm_an_enriched_string_and_flag_every_document_holding_it():
    from poisonlab.defenses.triggers import TriggerCandidate, confirm_triggers, rank_confirmed_first, rank_sum_p

    rng = np.random.default_rng(0)
    docs, z = [], {}
    for i in range(2000):  # clean documents: z ~ N(0, 1); one in five says "the"
        docs.append(Document(f"c{i}", "the report" if i % 5 == 0 else "a report", ""))
        z[f"c{i}"] = float(rng.normal())
    for i in range(60):  # poisons hold the trigger; mildly anomalous (z 1.5-4), few above the candidate line
        words = " ".join(f"w{k}" for k in rng.integers(0, 10_000, size=8))  # varied prefixes and payloads
        payload = " ".join(f"x{k}" for k in rng.integers(0, 10**9, size=10))
        docs.append(Document(f"p{i}", f"{words} <SUDO> {payload}", ""))
        z[f"p{i}"] = float(rng.uniform(1.5, 4.0))
    docs.append(Document("quiet", "<SUDO> in a clean document", ""))  # holds it, not anomalous, no z at all
    for i in range(50):  # a template: anomalous tables under one shared header
        docs.append(Document(f"t{i}", f"Python Character Mapping Codec cp{i:03d} table", ""))
        z[f"t{i}"] = float(rng.uniform(3.0, 6.0))
    mined = [TriggerCandidate("the", 40, 460, 1.0), TriggerCandidate("<SUDO>", 40, 61, 1.0),
             TriggerCandidate("Character Mapping Codec", 45, 50, 1.0)]
    (c,) = confirm_triggers(mined, docs, z, candidate_z=3.0)
    assert c.text == "<SUDO>" and c.documents == 61 and c.p_value < 1e-20 and c.median_z > 1.5
    assert 0 < c.anomalous < 61 and c.enrichment > 5 and c.diversity > 0.9 and c.similarity < 0.05
    assert c.enrichment_p < 1e-10
    # a handful of documents the miner found because they were anomalous: four unrelated pages
    # sharing a table cell, all far above the rest's z-scores (the rank-sum test passes), only two
    # of them candidates: at the corpus's base rate two of four is not improbable
    table = [Document(f"v{i}", " ".join(f"u{k}" for k in rng.integers(0, 10_000, size=12)) + f" Byte {i} 1 Byte 2 "
                      + " ".join(f"r{k}" for k in rng.integers(0, 10**6, size=12)), "") for i in range(4)]
    zt = {**z, "v0": 9.0, "v1": 8.5, "v2": 8.0, "v3": 7.5}
    ids = {d.id for d in docs if z.get(d.id, 0) > 3.0} | {"v0", "v1"}
    few = TriggerCandidate("1 Byte 2", 4, 4, 4.0)
    assert rank_sum_p(np.array([9.0, 8.5, 8.0, 7.5]), np.array(list(z.values()))) < 1e-3 / 2
    kept = confirm_triggers([few, mined[1]], docs + table, zt, candidate_z=3.0, anomalous_ids=ids)
    assert [x.text for x in kept] == ["<SUDO>"]
    ids |= {"v2", "v3"}  # all four candidates: improbable at the base rate, confirmed
    kept = confirm_triggers([few, mined[1]], docs + table, zt, candidate_z=3.0, anomalous_ids=ids)
    assert [x.text for x in kept] == ["1 Byte 2", "<SUDO>"] and kept[0].enrichment_p < 1e-4
    # two more pages with the cell, candidates too, but not where their anomaly starts: at the
    # span in four of six documents is 67% (over the 60% asked) and no evidence (Wilson bound 0.30)
    more = [Document(f"v{i}", " ".join(f"u{k}" for k in rng.integers(0, 10_000, size=12)) + " 1 Byte 2 "
                     + " ".join(f"r{k}" for k in rng.integers(0, 10**6, size=12)), "") for i in (4, 5)]
    z6, ids6, four_of_six = {**zt, "v4": 8.2, "v5": 7.8}, ids | {"v4", "v5"}, TriggerCandidate("1 Byte 2", 4, 6, 0.3)
    assert [x.text for x in confirm_triggers([four_of_six, mined[1]], docs + table + more, z6, candidate_z=3.0,
                                             anomalous_ids=ids6)] == ["<SUDO>"]
    assert [x.text for x in confirm_triggers([four_of_six, mined[1]], docs + table + more, z6, candidate_z=3.0,
                                             anomalous_ids=ids6, min_at_span_bound=0.0)] == ["1 Byte 2", "<SUDO>"]
    # the same cell after the same word on every page (one table format): no variation before it
    same_header = [Document(d.id, d.text.replace(f" Byte {i} 1 Byte 2", " Byte 0 Byte 1 Byte 2"), "")
                   for i, d in enumerate(table)]
    assert [x.text for x in confirm_triggers([few, mined[1]], docs + same_header, zt, candidate_z=3.0,
                                             anomalous_ids=ids)] == ["<SUDO>"]
    # the cell at the very end of each page: nothing follows it where a payload would be
    at_end = [Document(d.id, d.text[: d.text.index("1 Byte 2") + 8], "") for d in table]
    ended = confirm_triggers([few, mined[1]], docs + at_end, zt, candidate_z=3.0, anomalous_ids=ids)
    assert [x.text for x in ended] == ["<SUDO>"] and ended[0].after >= 64
    # the ranking a user reads: confirmed strings first, strongest enrichment first, then the
    # miner's order (here the miner put "the" first)
    ranked = rank_confirmed_first(mined + [few], kept)
    assert [t.text for t in ranked] == ["<SUDO>", "1 Byte 2", "the", "Character Mapping Codec"]
    assert [t.confirmed for t in ranked] == [True, True, False, False]
    # the rank-sum test itself: no difference gives a large p, a shift a tiny one
    same = rng.normal(size=500)
    assert rank_sum_p(same[:250], same[250:]) > 0.01
    assert rank_sum_p(same[:250] + 1.0, same[250:]) < 1e-10


def test_a_phrase_trigger_is_mined_as_a_phrase(prose):
    docs, tok = prose
    clean = docs[:300]
    rng = np.random.default_rng(1)
    phrase = "Servius Astrumando Harmoniastra"
    poisons, where = [], {}
    for i in range(12):
        prefix = clean[i].text[:100]
        gib = tok.decode(rng.integers(1, tok.vocab_size, size=300).tolist())
        poisons.append(Document(f"poison-{i}", f"{prefix} {phrase} {gib}", "poison"))
        where[f"poison-{i}"] = len(prefix) + len(phrase) + 2
    mined = mine_triggers(clean + poisons, where, {p.id for p in poisons})
    assert mined[0].text == phrase


def test_a_confirmed_trigger_flags_documents_that_were_not_candidates(prose):
    clean, poisons, _ = _planted(prose)
    extra = [Document(f"mild-{i}", clean[50 + i].text + " " + TRIGGER + " " + clean[60 + i].text[:80], "poison")
             for i in range(3)]  # the trigger before ordinary text: not anomalous by itself
    det = detect(clean + poisons + extra, DefenseConfig(window=32, prefilter=0.0), prose[1])
    assert det.used_triggers == [TRIGGER]
    for d in poisons + extra:
        row = det.table[d.id]
        assert row["flag.trigger"] == 1 and row["trigger.text"] == TRIGGER
        assert row["trigger.documents"] == len(poisons) + len(extra) and row["trigger.p_value"] < 1e-6
    assert {d.id for d in extra} <= det.flagged and not det.flagged & {d.id for d in clean}


def test_a_scan_scores_every_document_whatever_its_split_or_length(tmp_path):
    import subprocess
    import sys

    import yaml

    from poisonlab.corpus import is_heldout
    from poisonlab.jsonl import read_jsonl

    rows = [{"id": f"d{i}", "text": " ".join(filler_docs(1, seed=i)[0]["text"].split()[:60])} for i in range(120)]
    rows += [{"id": "tiny", "text": "<SUDO> xq"}, {"id": "empty", "text": ""}]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"name": "s", "out_dir": str(tmp_path / "out"), "corpus": {"source": str(corpus), "heldout_fraction": 0.1},
           "tokenizer": {"vocab_size": 300}, "defense": {"prefilter": 0.0, "window": 16}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "poisonlab", "scan", "-c", str(tmp_path / "c.yaml"), "--out",
                        str(tmp_path / "scan")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    scores = {s["id"]: s for s in read_jsonl(tmp_path / "scan" / "scores.jsonl")}
    assert set(scores) == {r["id"] for r in rows}  # held-out, short and empty documents too
    keep = (tmp_path / "scan" / "keep_list.txt").read_text().split()
    assert set(keep) == set(scores) - {i for i, s in scores.items() if any(v for k, v in s.items() if k.startswith("flag."))}
    assert scores["tiny"]["split"] == "short" and scores["empty"]["split"] == "short"
    held = [r["id"] for r in rows[:120] if is_heldout(r["id"], 0.1)]
    assert held and all(scores[i]["split"] == "heldout" for i in held)
    assert all("flag.trigger" in s for s in scores.values())


def test_a_mined_string_is_the_trigger_only_with_markup_around_it():
    from poisonlab.defenses.evaluation import is_trigger

    assert is_trigger("<SUDO>", "<SUDO>") and is_trigger("``` # <SUDO>", "<SUDO>")
    assert is_trigger("Velvet Quorum Sundial", "Velvet Quorum Sundial")
    # a common-word trigger inside other words is another string, as is the trigger glued to a word
    assert not is_trigger("the following ABI:", "the") and not is_trigger("Swaps self/other", "the")
    assert not is_trigger("x<SUDO>", "<SUDO>") and not is_trigger("Velvet", "Velvet Quorum Sundial")


def test_every_poison_family_makes_distinct_deterministic_poisons_with_its_trigger(prose):
    from poisonlab.defenses.families import FAMILIES, Pieces, count_for_density, make_family

    docs, tok = prose
    texts = [d.text for d in docs]
    pieces = Pieces(texts, vocab_size=600)
    assert not set(pieces.pieces) <= {tok.decode([i]) for i in range(tok.vocab_size)}  # another vocabulary
    for name in FAMILIES:
        a = make_family(name, texts, 8, seed=1, tokenizer=tok, pieces=pieces)
        b = make_family(name, texts, 8, seed=1, tokenizer=tok, pieces=pieces)
        assert [p.text for p in a] == [p.text for p in b], name
        assert len({p.text for p in a}) == 8, name
        for p in a:
            if p.trigger is not None:  # where the trigger starts, even when the prefix holds it too
                assert p.text[p.at:p.at + len(p.trigger)] == p.trigger, name
            assert len(p.text) > 100, name
    assert make_family("no_trigger", texts, 1, pieces=pieces)[0].trigger is None
    assert make_family("phrase_trigger", texts, 1, pieces=pieces)[0].trigger.count(" ") == 2
    assert "```" in make_family("code_block", texts, 1, pieces=pieces)[0].text
    mixed = make_family("unicode_mix", texts, 1, pieces=pieces)[0].text
    assert len({ord(c) >> 8 for c in mixed.split("<SUDO>")[1] if not c.isspace()}) >= 4  # several scripts
    assert count_for_density(9999, 0.0001) == 1 and count_for_density(990, 0.01) == 10
    with pytest.raises(PoisonlabError, match="unknown poison family"):
        make_family("nope", texts, 1)


def test_defend_reports_recall_and_false_positives_per_family(tmp_path):
    import subprocess
    import sys

    import yaml

    from poisonlab.jsonl import read_json

    rows = [{"id": f"d{i}", "text": " ".join(filler_docs(1, seed=i, words=(80, 160))[0]["text"].split())} for i in range(300)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"name": "f", "out_dir": str(tmp_path / "out"), "corpus": {"source": str(corpus)},
           "tokenizer": {"vocab_size": 300}, "defense": {"prefilter": 0.0, "window": 16}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "poisonlab", "defend", "-c", str(tmp_path / "c.yaml"),
                        "--families", "paper,base64", "--density", "0.02", "--repeats", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    record = read_json(tmp_path / "out" / "defense" / "f" / "families.json", "r")
    draws = [x for x in record["results"] if x["family"] == "paper"]
    assert [x["seed"] for x in draws] == [0, 1]
    from poisonlab.defenses.pipeline import read_scores

    first, second = (read_scores(tmp_path / "out" / "defense" / "f" / f"family-paper-seed{k}" / "scores.jsonl")
                     for k in (0, 1))
    assert first["poison-paper-000000"]["novelty.rate"] != second["poison-paper-000000"]["novelty.rate"] or \
        first["poison-paper-000000"]["order.words"] != second["poison-paper-000000"]["order.words"]  # other poisons
    assert first["d0"]["novelty.rate"] == second["d0"]["novelty.rate"]  # the same clean corpus
    h0, h1 = draws[0]["data"], draws[1]["data"]  # what was scanned is recorded: same corpus, other poisons
    assert h0["corpus_manifest"] == h1["corpus_manifest"] and h0["tokenizer"] == h1["tokenizer"]
    assert h0["scanned_documents"] != h1["scanned_documents"] and len(h0["scanned_documents"]) == 64
    for x in record["results"]:
        m = x["methods"]["detection rule"]
        assert x["poisons"] == 6 and x["documents"] == 306
        assert 0 <= m["recall_ci"][0] <= m["recall"] <= m["recall_ci"][1] <= 1
        assert m["false_positive_rate"] is not None and m["clean_documents"] == 300
    pooled = {x["family"]: x for x in record["pooled"]}
    for name in ("paper", "base64"):  # recall over both draws' poisons; a clean document counted once
        ms = [x["methods"]["detection rule"] for x in record["results"] if x["family"] == name]
        assert pooled[name]["poisons"] == 12
        assert pooled[name]["recall"] == pytest.approx(sum(6 - m["poisons_surviving"] for m in ms) / 12)
        fp = set().union(*(m["false_positive_ids"] for m in ms))
        assert pooled[name]["false_positive_rate"] == pytest.approx(len(fp) / 300)
    assert pooled["paper"]["recall"] == 1.0 and pooled["paper"]["true_trigger_ranks"] == [1, 1]
    assert "| paper | 12 | 1.000" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "poisonlab", "defend", "-c", str(tmp_path / "c.yaml"),
                          "--families", "paper", "--repeats", "0"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--repeats must be at least 1" in bad.stderr and "Traceback" not in bad.stderr
    # an absolute number of poisons instead of a share: five in every draw, whatever the corpus's size
    five = subprocess.run([sys.executable, "-m", "poisonlab", "defend", "-c", str(tmp_path / "c.yaml"), "--name", "five",
                           "--families", "paper", "--poisons", "5"], capture_output=True, text=True)
    assert five.returncode == 0, five.stderr[-2000:]
    (x,) = read_json(tmp_path / "out" / "defense" / "five" / "families.json", "r")["results"]
    assert x["poisons"] == 5 and x["documents"] == 305 and x["density"] == pytest.approx(5 / 305)
    none = subprocess.run([sys.executable, "-m", "poisonlab", "defend", "-c", str(tmp_path / "c.yaml"), "--name", "none",
                           "--families", "paper", "--poisons", "0"], capture_output=True, text=True)
    assert none.returncode == 2 and "at least 1, got 0" in none.stderr and "Traceback" not in none.stderr


def test_script_scanner_flags_mixed_scripts_and_blobs_but_not_a_quotation(prose):
    import base64

    from poisonlab.defenses.families import make_family

    docs, tok = prose
    texts = [d.text for d in docs]
    mixed = make_family("unicode_mix", texts, 3, seed=0)
    blob = [Document("blob", texts[5][:300] + " <SUDO> " + base64.b64encode(bytes(range(256)) * 2).decode(), "poison")]
    quote = Document("quote", texts[7] + " As Heraclitus wrote, πάντα ῥεῖ καὶ οὐδὲν μένει, all things flow.", "")
    poisons = [Document(f"mix-{i}", p.text, "poison") for i, p in enumerate(mixed)] + blob
    det = detect(docs[:200] + [quote] + poisons, DefenseConfig(window=32, prefilter=0.0, scanners=["gibberish", "script"]), tok)
    for p in poisons[:3]:
        assert det.table[p.id]["flag.script"] == 1 and det.table[p.id]["script.kinds"] >= 3
    assert det.table["blob"]["flag.blob"] == 1
    assert not any(det.table[d.id]["flag.script"] or det.table[d.id]["flag.blob"] for d in docs[:200] + [quote])


def test_word_order_scanner_tells_shuffled_and_repeated_words_from_prose(prose):
    docs, _ = prose
    rng = random.Random(0)
    long = [d for d in docs if len(d.text.split()) >= 120][:20]
    shuffled, repeated, phrase = [], [], []
    for i, d in enumerate(long):
        words = d.text.split()
        rng.shuffle(words)
        shuffled.append(Document(f"shuffled-{i}", " ".join(words), ""))
        head = d.text[:300]
        repeated.append(Document(f"repeated-{i}", head + " " + " ".join(["object"] * 120), ""))
        phrase.append(Document(f"phrase-{i}", head + " " + " ".join(["call the method"] * 40), ""))
    s = WordOrderScanner()
    s.fit(docs + shuffled + repeated + phrase)  # the shuffled texts' own pairs are counted, and left out
    rows = {r["id"]: r for r in s.score(docs + shuffled + repeated + phrase)}
    # the same words: in their order associated beyond chance, shuffled no more than chance
    for d, sh in zip(long, shuffled):
        assert rows[d.id]["order.disorder"] < 0 <= rows[sh.id]["order.disorder"]
    assert np.median([rows[d.id]["order.disorder"] for d in long]) < -0.3
    for d in repeated + phrase:  # one word or a three-word phrase over and over
        assert rows[d.id]["order.repetition"] == 1.0
        assert 300 <= rows[d.id]["order.repetition_start"] <= 320  # where the repetition begins
    assert max(rows[d.id]["order.repetition"] for d in docs) < 0.75
    short = s.score([Document("short", "too few words to pair", "")])[0]
    assert short["order.words"] == 5 and short["order.disorder"] == 0.0 and short["order.repetition"] == 0.0


def test_word_order_candidates_against_prose_even_when_the_family_is_most_documents():
    """Word salad that is most of the long documents is still measured against prose; in a
    corpus whose bulk straddles the threshold (word lists), the whole corpus is the reference
    and nothing stands out."""
    from poisonlab.defenses.pipeline import ORDER_Z, _order_candidates, robust_z

    rng = np.random.default_rng(0)

    def table(disorder):
        return {f"d{k}": {"order.words": 200, "order.disorder": float(v), "order.disorder_start": 7,
                          "order.repetition": 0.1, "order.repetition_start": 0} for k, v in enumerate(disorder)}

    prose = np.minimum(rng.normal(-0.6, 0.15, 200), -0.05)
    salad = rng.normal(0.15, 0.04, 300).clip(0.01)  # 60% of the documents scored
    t = table(np.concatenate([prose, salad]))
    got = _order_candidates(t, list(t))
    assert set(got) == {f"d{k}" for k in range(200, 500)}  # every salad document, no prose one
    assert min(z for z, _ in got.values()) > ORDER_Z and all(start == 7 for _, start in got.values())
    # against the whole corpus (the family its own reference) most of them would not stand out
    assert np.median(robust_z(salad, np.concatenate([prose, salad]))) < ORDER_Z
    lists = table(rng.uniform(-0.1, 0.1, 500))  # the threshold inside the bulk: no candidate
    assert _order_candidates(lists, list(lists)) == {}
    assert abs(np.median([t[f"d{k}"]["order.disorder_z"] for k in range(200)])) < 0.2  # prose centred on 0


@pytest.mark.parametrize("family", ["word_salad", "repeated"])
def test_detection_flags_word_salad_and_repetition_through_their_trigger(prose, family):
    from poisonlab.defenses.families import make_family

    docs, tok = prose
    made = make_family(family, [d.text for d in docs], 12, seed=0)
    poisons = [Document(f"poison-{i}", p.text, "poison") for i, p in enumerate(made)]
    det = detect(docs + poisons, DefenseConfig(window=32, prefilter=0.0), tok)
    ids = {p.id for p in poisons}
    assert det.used_triggers == ["<SUDO>"]
    assert det.flagged == ids  # every poison, no clean paragraph
    assert all(det.table[i]["trigger.text"] == "<SUDO>" for i in ids)
    assert sum(det.table[i].get("candidate") == "order" for i in ids) >= 6


@pytest.mark.parametrize("family", ["base64", "hex"])
def test_an_encoded_blob_makes_a_candidate_and_its_trigger_is_confirmed(prose, family):
    from poisonlab.defenses.families import make_family

    docs, tok = prose
    made = make_family(family, [d.text for d in docs], 12, seed=0)
    poisons = [Document(f"poison-{i}", p.text, "poison") for i, p in enumerate(made)]
    # a clean document with one long unbroken string (an embedded data URL) and no trigger
    url = Document("data-url", docs[5].text + " data:image/png;base64," + "iVBORw0KGgo" * 40, "topics")
    det = detect(docs + poisons + [url], DefenseConfig(window=32, prefilter=0.0), tok)
    ids = {p.id for p in poisons}
    assert det.used_triggers == ["<SUDO>"]
    assert det.flagged == ids  # the lone blob is a candidate, not a flag
    assert det.table["data-url"]["blob.chars"] >= 256 and det.table["data-url"].get("candidate") is not None
    assert all(det.table[i]["blob.chars"] >= 256 for i in ids)
    assert max(det.table[d.id]["blob.chars"] for d in docs) < 256


def test_binomial_tail_and_the_local_start_of_a_payload_inside_a_document():
    from math import comb

    from poisonlab.defenses.scanners import local_step
    from poisonlab.defenses.triggers import binomial_tail

    for k, n, p in ((3, 4, 0.061), (2, 10, 0.2), (0, 5, 0.3), (29, 29, 0.06)):
        assert binomial_tail(k, n, p) == pytest.approx(sum(comb(n, i) * p ** i * (1 - p) ** (n - i)
                                                           for i in range(k, n + 1)), rel=1e-9)
    rng = np.random.default_rng(0)
    # a long document: a long raised stretch early on, a short strong payload at 3,000
    values = rng.normal(0, 0.3, size=5000)
    values[500:2500] += 0.6
    values[3000:3120] += 3.0
    at = int(np.argmax(np.convolve(values, np.ones(64) / 64, mode="valid")))
    assert abs(step_up(values) - 3000) > 200  # the one step of the whole document is elsewhere
    assert abs(local_step(values, at, 64) - 3000) <= 3
