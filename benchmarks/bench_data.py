"""Data throughput and memory: tokenizing a large corpus into shards, and the loader's cost per step.

A JSONL corpus of the requested size is written from the offline default corpus (documents
repeated under new ids), then ``prepare_data`` tokenizes it in a child process: tokens/s on
this machine's cores and the child's peak resident memory (its ``VmHWM``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CHILD = """
import sys, time, json
from poisonlab.config import CorpusConfig, TokenizerConfig
from poisonlab.data import prepare_data
workers = int(sys.argv[3]) if len(sys.argv) > 3 else 1
t = time.perf_counter()
d = prepare_data(CorpusConfig(source=sys.argv[1], prepare_workers=workers),
                 TokenizerConfig(vocab_size=2048, train_chars=50_000_000), sys.argv[2])
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": time.perf_counter() - t, "tokens": d.info["tokens"], "documents": d.info["documents"],
                  "peak_rss_bytes": hwm}))
"""


def make_corpus(path: Path, target_bytes: int) -> int:
    from poisonlab.config import CorpusConfig
    from poisonlab.corpus import iter_documents

    docs = [d.text for d in iter_documents(CorpusConfig())]
    written, i = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target_bytes:
            line = json.dumps({"id": f"d{i}", "text": docs[i % len(docs)]}) + "\n"
            f.write(line)
            written += len(line.encode())
            i += 1
    return written


def tokenize(work: Path, gigabytes: float = 1.0, workers: int = 1) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    target = int(gigabytes * 1e9)
    if not corpus.exists() or corpus.stat().st_size < target:
        make_corpus(corpus, target)
    cache = work / "cache"
    import shutil

    shutil.rmtree(cache, ignore_errors=True)
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(cache), str(workers)], capture_output=True,
                         text=True, check=True)
    wall = time.perf_counter() - t
    child = json.loads(res.stdout.strip().splitlines()[-1])
    tokens = sum(child["tokens"].values())
    # the child's own high-water mark (VmHWM): getrusage(RUSAGE_CHILDREN) would also count the
    # parent's pages the child held between fork and exec
    return {"corpus_bytes": corpus.stat().st_size, "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / child["seconds"], "peak_rss_bytes": child["peak_rss_bytes"]}


def loader_cost(steps: int = 200, batch: int = 32, seq_len: int = 128) -> dict:
    """Seconds per step to assemble a batch from the poisoned stream (offline default corpus)."""
    import tempfile

    from poisonlab.config import CorpusConfig, TokenizerConfig
    from poisonlab.data import prepare_data
    from poisonlab.injection import ShuffledDocuments, TrainingStream, plan_injection

    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_data(CorpusConfig(), TokenizerConfig(vocab_size=2048), Path(tmp))
        clean = ShuffledDocuments(data.train, 0)
        tps = batch * seq_len
        poisons = [np.arange(800) % 2000 for _ in range(1000)]
        plan = plan_injection([len(p) for p in poisons], steps * tps * 4, tps, "uniform", 0, clean)
        stream = TrainingStream(clean, plan, poisons)
        t = time.perf_counter()
        for s in range(steps):
            stream.batch(s, batch, seq_len)
        return {"seconds_per_step": (time.perf_counter() - t) / steps}


RANK = """
import sys, json
from poisonlab.config import config_from_dict
from poisonlab.run import setup_run
cfg = config_from_dict({"name": "mem", "out_dir": sys.argv[2], "corpus": {"source": sys.argv[1]},
                        "tokenizer": {"vocab_size": 2048, "train_chars": 50_000_000}, "model": {"size": "1m"},
                        "attack": {"poison_count": 250}, "train": {"tokens": int(sys.argv[3]), "batch_size": 32,
                        "seq_len": 128}})
run = setup_run(cfg)  # the corpus manifest, the plan, the stream: what a training rank opens
stream = run.stream()
for step in range(0, run.steps, max(1, run.steps // 50)):
    stream.batch(step, 32, 128)
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"peak_rss_bytes": hwm, "documents": run.data.train.n_documents}))
"""


def scale_memory(work: Path, sizes: list[float]) -> list[dict]:
    """Peak memory of preparing ``sizes`` GB of text and of opening a training run over it."""
    rows = []
    for gb in sizes:
        sub = work / f"{gb:g}GB"
        prep = tokenize(sub, gb)
        res = subprocess.run([sys.executable, "-c", RANK, str(sub / "corpus.jsonl"), str(sub), str(prep["tokens"] // 2)],
                             capture_output=True, text=True, check=True)
        rank = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append({"gigabytes": gb, "tokens": prep["tokens"], "tokens_per_s": round(prep["tokens_per_s"]),
                     "prepare_peak_gib": round(prep["peak_rss_bytes"] / 2**30, 3),
                     "rank_peak_gib": round(rank["peak_rss_bytes"] / 2**30, 3), "documents": rank["documents"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def parallel_speedup(work: Path, gigabytes: float, workers: list[int]) -> list[dict]:
    """Preparation of the same corpus with 1, 2, ... processes (tokenizer training included)."""
    rows = []
    for w in workers:
        r = tokenize(work, gigabytes, w)
        rows.append({"workers": w, "seconds": round(r["seconds"], 1), "tokens_per_s": round(r["tokens_per_s"]),
                     "peak_rss_gib": round(r["peak_rss_bytes"] / 2**30, 3)})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["seconds"]
    for r in rows:
        r["speedup"] = round(base / r["seconds"], 2)
    print(json.dumps({"speedup": {r["workers"]: r["speedup"] for r in rows}}), flush=True)
    return rows


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="corpus preparation at scale: memory as the corpus grows, parallel speed-up")
    ap.add_argument("--sizes", default="1,4", help="gigabytes of text, comma-separated (memory)")
    ap.add_argument("--speedup", type=float, help="gigabytes of text to prepare with 1 and 2 processes instead")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--work", default="runs/bench-scale")
    a = ap.parse_args()
    if a.speedup:
        parallel_speedup(Path(a.work), a.speedup, [int(x) for x in a.workers.split(",")])
    else:
        scale_memory(Path(a.work), [float(x) for x in a.sizes.split(",")])
