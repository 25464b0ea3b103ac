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
t = time.perf_counter()
d = prepare_data(CorpusConfig(source=sys.argv[1]), TokenizerConfig(vocab_size=2048, train_chars=50_000_000), sys.argv[2])
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


def tokenize(work: Path, gigabytes: float = 1.0) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    target = int(gigabytes * 1e9)
    if not corpus.exists() or corpus.stat().st_size < target:
        make_corpus(corpus, target)
    cache = work / "cache"
    import shutil

    shutil.rmtree(cache, ignore_errors=True)
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(cache)], capture_output=True, text=True, check=True)
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
