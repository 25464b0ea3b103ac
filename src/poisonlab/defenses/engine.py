"""The scanners on a cluster: a ``datatrove`` pipeline step, then the same rule as one process.

datatrove's executors run the same pipeline locally (``LocalPipelineExecutor``, processes on
one machine) or as Slurm array jobs (``SlurmPipelineExecutor``), with per-task completion
markers so a killed job resumes where it stopped. The corpus-level passes stay on one
machine: the token statistics, the word document frequencies and the word-pair counts are
fitted first (one pass each, saved as ``.npz`` without pickle); every task then scores its
shard with them. The merged score table goes through :func:`~poisonlab.defenses.pipeline.decide`,
the rule a one-process scan applies, so both engines flag the same documents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from ..config import DefenseConfig
from ..corpus import Document
from ..tokenizer import Tokenizer

try:
    from datatrove.pipeline.base import PipelineStep
except ImportError:  # the optional dependency; scan_with_datatrove says how to install it
    PipelineStep = object

PER_DOCUMENT = ("compression", "language_shift", "script")
"""Scanners listed in ``defense.scanners`` that score a document on its own (no corpus pass)."""


class ScoreDocuments(PipelineStep):
    """Adds every per-document scanner's fields (``<scanner>.<field>``) to each document's
    metadata, with the corpus statistics fitted beforehand in ``state_dir``."""

    name = "poisonlab scanners"
    type = "📊 - SCORER"

    def __init__(self, state_dir: str, defense: dict):
        super().__init__()
        self.state_dir, self.defense = state_dir, defense

    def _scanners(self) -> list:
        from .reference import TokenStatistics
        from .scanners import (CompressionScanner, GibberishScanner, LanguageShiftScanner, NoveltyScanner,
                               ScriptScanner, WordOrderScanner)

        cfg = DefenseConfig(**self.defense)
        state = Path(self.state_dir)
        out = [GibberishScanner(Tokenizer.load(state / "tokenizer"), TokenStatistics.load(state / "token_stats.npz"),
                                cfg.window),
               NoveltyScanner.load(state / "novelty.npz"), WordOrderScanner.load(state / "order.npz")]
        kinds = {"compression": CompressionScanner, "language_shift": LanguageShiftScanner, "script": ScriptScanner}
        out += [kinds[k]() for k in PER_DOCUMENT if k in cfg.scanners]
        return out

    def run(self, data, rank: int = 0, world_size: int = 1):
        scanners = self._scanners()
        for doc in data:
            d = Document(doc.id, doc.text, doc.metadata.get("source", ""))
            for s in scanners:
                row = s.score([d])[0]
                row.pop("id")
                doc.metadata.update(row)
            self.stat_update("scored")
            yield doc


def fit_state(docs: list[Document], cfg: DefenseConfig, tokenizer: Tokenizer, state: Path) -> None:
    """The corpus-level passes, saved where every task can load them."""
    from .scanners import GibberishScanner, NoveltyScanner, WordOrderScanner

    state.mkdir(parents=True, exist_ok=True)
    g = GibberishScanner(tokenizer, window=cfg.window, cache_tokens=0)
    g.fit(docs)
    g.stats.save(state / "token_stats.npz")
    tokenizer.save(state / "tokenizer")
    for scanner, name in ((NoveltyScanner(), "novelty.npz"), (WordOrderScanner(), "order.npz")):
        scanner.fit(docs)
        scanner.save(state / name)


def read_score_table(folder: Path) -> dict[str, dict]:
    """The scored shards merged into one table: id -> the scanners' ``<scanner>.<field>`` values."""
    table: dict[str, dict] = {}
    for p in sorted(folder.glob("*.jsonl")):
        for line in p.read_text(encoding="utf-8").splitlines():
            if line:
                r = json.loads(line)
                table[r["id"]] = {"id": r["id"], **{k: v for k, v in r["metadata"].items() if "." in k}}
    return table


def scan_with_datatrove(docs: list[Document], cfg: DefenseConfig, tokenizer: Tokenizer, out: str | Path,
                        tasks: int = 2, workers: int = 2):
    """Score ``docs`` with datatrove's local executor (shards under ``<out>/input``, fitted
    statistics under ``<out>/state``, scored shards under ``<out>/scores``) and apply the
    detection rule to the merged table; returns the :class:`~poisonlab.defenses.pipeline.Detection`.

    Every document is tokenized (the cascade's ``prefilter`` is a way to tokenize fewer on one
    machine; here the tasks share that cost), so the gibberish z-scores are taken over all."""
    from ..errors import PoisonlabError
    from .pipeline import SCORE_FIELD, decide, robust_z, scan
    from .scanners import NearDuplicateScanner

    try:
        from datatrove.executor import LocalPipelineExecutor
        from datatrove.pipeline.readers import JsonlReader
        from datatrove.pipeline.writers import JsonlWriter
    except ImportError:
        raise PoisonlabError("the datatrove engine needs datatrove: pip install 'poisonlab[defenses]'") from None

    out = Path(out)
    # datatrove skips tasks it finished before: that resumes a killed scan of the same input,
    # and would reuse stale scores of another one, so a changed input starts afresh
    h = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    for d in docs:
        h.update(f"{len(d.id)}:{d.id}{len(d.text)}:".encode() + d.text.encode("utf-8", "surrogatepass"))
    stamp = out / "input.sha256"
    if stamp.is_file() and stamp.read_text().strip() != h.hexdigest():
        for sub in ("input", "scores", "logs", "state"):
            shutil.rmtree(out / sub, ignore_errors=True)
    inp = out / "input"
    inp.mkdir(parents=True, exist_ok=True)
    stamp.write_text(h.hexdigest() + "\n")
    for k in range(tasks):
        with open(inp / f"part-{k:05d}.jsonl", "w", encoding="utf-8") as f:
            for d in docs[k::tasks]:
                f.write(json.dumps({"id": d.id, "text": d.text, "source": d.source}, ensure_ascii=False) + "\n")
    fit_state(docs, cfg, tokenizer, out / "state")
    LocalPipelineExecutor(
        pipeline=[JsonlReader(str(inp), compression=None),
                  ScoreDocuments(str(out / "state"), dataclasses.asdict(cfg)),
                  JsonlWriter(str(out / "scores"), compression=None)],
        tasks=tasks, workers=workers, logging_dir=str(out / "logs"), start_method="spawn",
    ).run()
    table = read_score_table(out / "scores")
    missing = [d.id for d in docs if d.id not in table]
    if missing:
        raise PoisonlabError(f"{out / 'scores'}: {len(missing):,} documents were not scored (first: {missing[0]!r}); "
                             "run the scan again to finish the missing tasks")
    if "near_duplicate" in cfg.scanners:  # clusters need the whole corpus at once
        for i, row in scan(docs, [NearDuplicateScanner()]).items():
            table[i].update(row)
    ids = [d.id for d in docs]
    z = robust_z(np.array([table[i][SCORE_FIELD] for i in ids]))
    return decide(docs, cfg, table, ids, z)
