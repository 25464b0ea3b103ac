"""Corpus scanning throughput on one core: documents/s of each scanner, the datatrove
baseline filters beside them, the reference-model stage in tokens/s, and ``poisonlab scan``
end to end (corpus read, tokenizer trained and data prepared, every document scanned,
keep-list written) cold (empty cache) and warm (prepared data cached), per document and per MB.

    python benchmarks/bench_scan.py [--documents 3000] [--corpus python-stdlib]

Runs on the offline default corpus (Python's documentation and sources) with 250 paper-style
poisons mixed in. One process and one tokenizer thread (RAYON_NUM_THREADS=1), so the rates
are per core; the ratios compare scanners measured in the same run.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))


def scan_set(n_docs: int):
    from poisonlab.config import RunConfig
    from poisonlab.defenses.evaluation import scan_set as make

    cfg = RunConfig(out_dir=str(Path(tempfile.gettempdir()) / "poisonlab-bench"))
    cfg.tokenizer.vocab_size = 2048
    cfg.attack.poison_count = 250
    docs, poisons, tok = make(cfg)
    clean = [d for d in docs if d.id not in poisons][: n_docs]
    return clean + [d for d in docs if d.id in poisons], tok


def rate(scanner, docs) -> dict:
    t = time.perf_counter()
    scanner.fit(docs)
    fit = time.perf_counter() - t
    t = time.perf_counter()
    scanner.score(docs)
    score = time.perf_counter() - t
    return {"fit_s": fit, "score_s": score, "docs_per_s": len(docs) / (fit + score),
            "score_docs_per_s": len(docs) / score}


def run(n_docs: int = 3000) -> dict:
    from poisonlab.defenses.scanners import (CompressionScanner, GibberishScanner, LanguageShiftScanner,
                                             NearDuplicateScanner, NoveltyScanner, WordOrderScanner)

    torch.set_num_threads(1)
    docs, tok = scan_set(n_docs)
    chars = sum(len(d.text) for d in docs)
    out = {"documents": len(docs), "mean_chars": chars / len(docs), "scanners": {}}
    t = time.perf_counter()  # the ceiling of any token-level scanner: one tokenizer pass with offsets
    tok._fast.encode_batch([d.text for d in docs], add_special_tokens=False)
    out["scanners"]["(tokenizer pass alone)"] = {"docs_per_s": len(docs) / (time.perf_counter() - t)}
    for s in (GibberishScanner(tok), NoveltyScanner(), WordOrderScanner(), CompressionScanner(),
              NearDuplicateScanner(), LanguageShiftScanner()):
        out["scanners"][s.name] = rate(s, docs)
    out["cascade"] = cascade(docs, tok)
    try:
        from datatrove.data import Document as DT

        from poisonlab.defenses.baselines import _filters

        for name, cls in _filters().items():
            f = cls()
            f.filter(DT(text=docs[0].text, id="warm"))  # loads spaCy's tokenizer once
            t = time.perf_counter()
            for d in docs:
                f.filter(DT(text=d.text, id=d.id))
            out["scanners"][f"baseline {name}"] = {"docs_per_s": len(docs) / (time.perf_counter() - t)}
    except ImportError:
        pass
    out["model"] = model_stage(docs[:64], tok)
    return out


def cascade(docs, tok) -> dict:
    """The detection rule's scanning stage (``pipeline.token_stage``), end to end, with and
    without the cascade. With a sample of 100 instead of 2,000 documents, the sample is the
    share of this set that the default sample is of a corpus of ~65,000 documents. The 250
    poisons are 7.7% of this set and all go on to the token scanner; the last row leaves them
    out, as in a corpus where a few hundred poisons are a negligible share."""
    from poisonlab.config import DefenseConfig
    from poisonlab.defenses.pipeline import token_stage

    out = {}
    d = DefenseConfig()
    clean = [x for x in docs if x.source != "poison"]
    for name, subset, prefilter, calibration in (
            ("every document tokenized", docs, 0.0, d.calibration),
            ("cascade", docs, d.prefilter, d.calibration),
            ("cascade, sample 100", docs, d.prefilter, 100),
            ("cascade, sample 100, no poisons", clean, d.prefilter, 100)):
        t = time.perf_counter()
        _, scored, _ = token_stage(subset, DefenseConfig(prefilter=prefilter, calibration=calibration), tok)
        out[name] = {"docs_per_s": len(subset) / (time.perf_counter() - t), "token_scored": len(scored),
                     "documents": len(subset)}
    return out


def end_to_end(source: str) -> dict:
    """``poisonlab scan`` of a whole corpus as a user runs it, twice: with an empty cache (the
    tokenizer is trained and the corpus prepared first) and again with the cache warm."""
    from poisonlab.config import RunConfig
    from poisonlab.corpus import scan_documents
    from poisonlab.data import prepare_data
    from poisonlab.defenses.pipeline import detect, mark_splits, write_detection

    out = {}
    with tempfile.TemporaryDirectory() as d:
        cfg = RunConfig(out_dir=d)
        cfg.corpus.source = source
        cfg.tokenizer.vocab_size = 2048
        for name in ("cold", "warm"):
            t = time.perf_counter()
            data = prepare_data(cfg.corpus, cfg.tokenizer, Path(d) / "cache")
            prepared = time.perf_counter() - t
            docs = list(scan_documents(cfg.corpus))
            det = detect(docs, cfg.defense, data.tokenizer)
            mark_splits(det, docs, cfg.corpus)
            write_detection(det, Path(d) / "scan")
            sec = time.perf_counter() - t
            mb = sum(len(x.text.encode("utf-8", "surrogatepass")) for x in docs) / 1e6
            out[name] = {"documents": len(docs), "mb": mb, "seconds": sec, "prepare_seconds": prepared,
                         "docs_per_s": len(docs) / sec, "mb_per_s": mb / sec}
    return out


def model_stage(docs, tok) -> dict:
    """Tokens/s of the reference-model scanner with an (untrained) 1m-size model."""
    from poisonlab.defenses.model_scanner import ModelSurprisalScanner
    from poisonlab.models import build_model, get_size

    with tempfile.TemporaryDirectory() as d:
        model = build_model(get_size("1m"), tok.vocab_size, tok.eos_id)
        model.save_pretrained(d, safe_serialization=True)
        tok.save(d)
        s = ModelSurprisalScanner(d)
        t = time.perf_counter()
        s.score(docs)
        sec = time.perf_counter() - t
    return {"size": "1m", "tokens": s.tokens_scored, "tokens_per_s": s.tokens_scored / sec}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--documents", type=int, default=3000, help="clean documents (250 poisons are added)")
    p.add_argument("--corpus", default="python-stdlib", help="corpus.source scanned end to end (default: the "
                                                              "offline default corpus)")
    args = p.parse_args()
    r = run(args.documents)
    r["end_to_end"] = end_to_end(args.corpus)
    print(f"{r['documents']:,} documents, {r['mean_chars']:,.0f} characters on average; one core")
    ref = r["scanners"]["gibberish"]["docs_per_s"]
    print(f"{'scanner':<38} {'docs/s':>10} {'vs gibberish':>13}")
    for name, v in r["scanners"].items():
        print(f"{name:<38} {v['docs_per_s']:>10,.0f} {v['docs_per_s'] / ref:>12.2f}x")
    for name, v in r["cascade"].items():
        print(f"{'rule: ' + name:<38} {v['docs_per_s']:>10,.0f} {v['docs_per_s'] / ref:>12.2f}x"
              f"  ({v['token_scored']:,} of {v['documents']:,} documents tokenized)")
    m = r["model"]
    print(f"reference model ({m['size']}): {m['tokens_per_s']:,.0f} tokens/s on one core")
    e = r["end_to_end"]
    for name, v in e.items():
        print(f"poisonlab scan {args.corpus}, {name} cache: {v['documents']:,} documents, {v['mb']:.1f} MB in "
              f"{v['seconds']:.0f} s (preparing {v['prepare_seconds']:.0f} s): {v['docs_per_s']:,.0f} docs/s, "
              f"{v['mb_per_s']:.2f} MB/s")
    print(f"cold / warm time: {e['cold']['seconds'] / e['warm']['seconds']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
