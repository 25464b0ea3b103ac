"""How well a defense works, measured against the ground truth of an injection.

The scan set is what a training run would read: the clean training documents of the corpus
and the run's poison documents (the injection manifest says which are which). Every
scanner field, the detection rule and the baseline filters are scored on it: recall,
precision, false-positive rate, poisons surviving, clean documents and characters lost,
ROC and precision-recall curves with their areas. Adaptive poison variants (PROTOCOL-style
poisons made harder to see) are evaluated the same way and reported, not tuned to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np

from ..config import RunConfig, config_from_dict
from ..corpus import Document, iter_split
from ..data import prepare_data
from ..errors import PoisonlabError
from ..jsonl import write_jsonl
from ..paths import atomic_write_text
from ..provenance import code_version
from .pipeline import Detection, detect, write_detection

VARIANTS: dict[str, dict] = {
    "paper": {},
    "long_prefix": {"attack.prefix_chars": [2000, 4000]},
    "natural_payload": {"attack.payload": "natural"},
    "unigram_payload": {"attack.payload": "unigram"},
    "low_entropy_payload": {"attack.payload": "low_entropy"},
    "common_word_trigger": {"attack.trigger": "the"},
}
"""The paper's poison and adaptive variants that try to evade the scanners."""

SCORE_FIELDS = ("novelty.rate", "gibberish.bigram_surprisal", "gibberish.unigram_surprisal", "gibberish.token_entropy",
                "compression.ratio", "near_duplicate.cluster_size", "language_shift.shift")


def is_trigger(mined: str, trigger: str) -> bool:
    """Whether a mined string is the trigger, alone or with markup only around it (`# <SUDO>`
    in a code block): a string that holds a common-word trigger among other words
    (``the following ABI:``) is some other string, not the trigger found."""
    at = mined.find(trigger)
    return at >= 0 and not re.search(r"\w", mined[:at] + mined[at + len(trigger):])


def variant_config(cfg: RunConfig, variant: str) -> RunConfig:
    if variant not in VARIANTS:
        raise PoisonlabError(f"unknown poison variant {variant!r}; choose from {list(VARIANTS)}")
    d = cfg.to_dict()
    for key, value in VARIANTS[variant].items():
        section, name = key.split(".")
        d[section][name] = value
    return config_from_dict(d)


def scan_set(cfg: RunConfig, progress: bool = False):
    """(documents, poison ids, tokenizer): the clean training split plus the run's poisons."""
    from ..run import make_poisons

    data = prepare_data(cfg.corpus, cfg.tokenizer, Path(cfg.out_dir) / "cache", progress=progress)
    clean = list(iter_split(cfg.corpus, "train"))
    poisons = make_poisons(cfg, data)
    docs = clean + [Document(p.id, p.text, "poison") for p in poisons]
    return docs, {p.id for p in poisons}, data.tokenizer


def confusion(flagged: set[str], poisons: set[str], docs: list[Document]) -> dict:
    from ..metrics.rates import wilson

    clean = [d for d in docs if d.id not in poisons]
    tp = len(flagged & poisons)
    fp = len(flagged - poisons)
    lost_chars = sum(len(d.text) for d in clean if d.id in flagged)
    return {
        "recall_ci": list(wilson(tp, len(poisons))) if poisons else None,
        "false_positive_rate_ci": list(wilson(fp, len(clean))) if clean else None,
        "poisons": len(poisons), "clean_documents": len(clean), "flagged": len(flagged),
        "recall": tp / len(poisons) if poisons else None,
        "precision": tp / len(flagged) if flagged else None,
        "false_positive_rate": fp / len(clean) if clean else None,
        "poisons_surviving": len(poisons) - tp,
        "clean_documents_lost": fp,
        "clean_characters_lost_share": lost_chars / max(sum(len(d.text) for d in clean), 1),
    }


def curves(scores: np.ndarray, labels: np.ndarray) -> dict:
    """ROC and precision-recall curves of a score (higher = more suspicious), with areas."""
    from ..metrics.roc import threshold_counts

    tp, fp, P, N = threshold_counts(scores, labels)
    tpr, fpr = np.r_[0, tp / P], np.r_[0, fp / N]
    precision = np.r_[1, tp / (tp + fp)]
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "precision": precision.tolist(),
            "roc_auc": float(np.trapezoid(tpr, fpr)),
            "average_precision": float(np.sum(np.diff(tpr) * precision[1:])),
            "recall_at_fpr_0.001": float(tpr[np.searchsorted(fpr, 0.001, side="right") - 1])}


def recall_at_clean_loss(scores: np.ndarray, labels: np.ndarray, clean_lost: int) -> float:
    """Recall of a score thresholded to drop exactly ``clean_lost`` clean documents."""
    neg = np.sort(scores[labels == 0])[::-1]
    if clean_lost >= len(neg):
        return 1.0
    thr = neg[clean_lost]  # the highest clean score that is kept
    return float((scores[labels == 1] > thr).mean())


def evaluate_variant(cfg: RunConfig, variant: str, baselines: bool = True, progress: bool = False,
                     baseline_cache: dict | None = None) -> tuple[dict, Detection]:
    vcfg = variant_config(cfg, variant)
    docs, poisons, tok = scan_set(vcfg, progress)
    t0 = time.perf_counter()
    det = detect(docs, vcfg.defense, tok, progress=progress)
    seconds = time.perf_counter() - t0
    labels = np.array([d.id in poisons for d in docs], dtype=np.int64)
    methods = {"detection rule": confusion(det.flagged, poisons, docs)}
    flag_fields = sorted({k for r in det.table.values() for k in r if k.startswith("flag.")})
    for f in flag_fields:
        methods[f] = confusion({i for i, r in det.table.items() if r.get(f)}, poisons, docs)
    scores = {f: np.array([float(det.table[d.id].get(f, 0.0)) for d in docs])
              for f in SCORE_FIELDS if any(f in r for r in det.table.values())}
    if baselines:
        from .baselines import run_baselines

        for name, dropped in run_baselines(docs, cache=baseline_cache).items():
            m = confusion(set(dropped), poisons, docs)
            m["scanner_recall_at_equal_clean_loss"] = recall_at_clean_loss(
                scores["gibberish.bigram_surprisal"], labels, m["clean_documents_lost"])
            methods[f"baseline {name}"] = m
    trigger = vcfg.attack.trigger
    rank = next((i + 1 for i, t in enumerate(det.triggers) if t.text == trigger), None)
    result = {
        "variant": variant, "settings": VARIANTS[variant], "trigger": trigger,
        "mined_triggers": [t.record() for t in det.triggers[:10]], "true_trigger_rank": rank,
        "used_triggers": det.used_triggers, "scan_seconds": seconds, "documents": len(docs),
        "token_scored": det.token_scored,
        "methods": methods, "curves": {f: curves(s, labels) for f, s in scores.items()},
    }
    return result, det


def evaluate_family(cfg: RunConfig, family: str, density: float, progress: bool = False,
                    pieces=None, seed: int | None = None, count: int | None = None) -> tuple[dict, Detection]:
    """Poisons of a family (:mod:`poisonlab.defenses.families`) at ``density`` of the corpus's
    documents (or exactly ``count`` of them), mixed into every document of ``corpus.source``,
    scanned by the detection rule. ``seed`` (default ``cfg.seed``) draws the poisons; the record
    holds the hashes of the corpus manifest, the tokenizer and the exact set scanned."""
    seed = cfg.seed if seed is None else seed
    from ..corpus import scan_documents
    from .families import count_for_density, make_family

    data = prepare_data(cfg.corpus, cfg.tokenizer, Path(cfg.out_dir) / "cache", progress=progress)
    clean = list(scan_documents(cfg.corpus))
    if count is None:
        count = count_for_density(len(clean), density)
    elif count < 1:
        raise PoisonlabError(f"the number of poisons must be at least 1, got {count}")
    else:
        density = count / (len(clean) + count)
    made = make_family(family, [d.text for d in clean if len(d.text) >= 200] or [d.text for d in clean], count,
                       seed=seed, tokenizer=data.tokenizer, pieces=pieces)
    poisons = [Document(f"poison-{family}-{i:06d}", p.text, "poison") for i, p in enumerate(made)]
    docs = clean + poisons
    ids = {p.id for p in poisons}
    scanned = hashlib.sha256()
    for d in docs:  # the exact set scanned: the clean documents and this draw's poisons
        scanned.update(f"{d.id}\0{d.text}\0".encode())
    hashes = {"corpus_manifest": data.hashes["corpus_manifest"], "tokenizer": data.hashes["tokenizer"],
              "scanned_documents": scanned.hexdigest()}
    t0 = time.perf_counter()
    det = detect(docs, cfg.defense, data.tokenizer, progress=progress)
    seconds = time.perf_counter() - t0
    trigger = made[0].trigger if made else None
    rank = next((i + 1 for i, t in enumerate(det.triggers) if is_trigger(t.text, trigger)), None) if trigger else None
    m = confusion(det.flagged, ids, docs)
    m["false_positive_ids"] = sorted(det.flagged - ids)
    return {"family": family, "density": density, "seed": seed, "corpus": cfg.corpus.source, "trigger": trigger,
            "data": hashes, "documents": len(docs), "poisons": len(ids), "true_trigger_rank": rank,
            "mined_triggers": [t.record() for t in det.triggers[:10]], "used_triggers": det.used_triggers,
            "scan_seconds": seconds, "methods": {"detection rule": m}}, det


def pool_family(repeats: list[dict]) -> dict:
    """One family's scans over independent poison draws (seeds) of the same corpus, pooled:
    recall over every poison of every draw; the false-positive rate counts a clean document
    once if any scan flagged it (the clean documents are the same in every draw, so they are
    not pooled as independent trials)."""
    from ..metrics.rates import wilson

    ms = [r["methods"]["detection rule"] for r in repeats]
    tp = sum(m["poisons"] - m["poisons_surviving"] for m in ms)
    n = sum(m["poisons"] for m in ms)
    fp_ids = sorted(set().union(*(m["false_positive_ids"] for m in ms)))
    clean = ms[0]["clean_documents"]
    first = repeats[0]
    return {"family": first["family"], "density": first["density"], "corpus": first["corpus"],
            "trigger": first["trigger"], "seeds": [r["seed"] for r in repeats], "poisons": n,
            "true_trigger_ranks": [r["true_trigger_rank"] for r in repeats],
            "used_triggers": [r["used_triggers"] for r in repeats],
            "scan_seconds": [r["scan_seconds"] for r in repeats],
            "recall": tp / n if n else None, "recall_ci": list(wilson(tp, n)) if n else None,
            "false_positive_rate": len(fp_ids) / clean if clean else None,
            "false_positive_rate_ci": list(wilson(len(fp_ids), clean)) if clean else None,
            "false_positive_ids": fp_ids, "clean_documents": clean}


def evaluate_defense(cfg: RunConfig, variants: list[str], out: str | Path, baselines: bool = True,
                     progress: bool = False) -> list[dict]:
    """Evaluate every variant; write ``<out>/<variant>/`` (scores, triggers, keep-list) and
    ``<out>/defense.json`` (config, code version, metrics, curves) and figures."""
    out = Path(out)
    results = []
    cache: dict = {}
    for v in variants:
        res, det = evaluate_variant(cfg, v, baselines, progress, cache)
        write_detection(det, out / v)
        results.append(res)
        if progress:
            m = res["methods"]["detection rule"]
            print(f"{v}: recall {m['recall']:.4f}, false-positive rate {m['false_positive_rate']:.5f}, "
                  f"true trigger rank {res['true_trigger_rank']}")
    record = {"config": dataclasses.asdict(cfg), "code_version": code_version(), "seed": cfg.seed,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": results}
    atomic_write_text(out / "defense.json", json.dumps(record, indent=1))
    write_jsonl(out / "defense_table.jsonl", (dict(variant=r["variant"], method=k, **m)
                                             for r in results for k, m in r["methods"].items()))
    from .figures import defense_figures

    defense_figures(results, out)
    return results
